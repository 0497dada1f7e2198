//! A `.safetensors` file from outside (a model, an uploaded adapter): opening it and reading
//! every tensor either works or is an error, never a panic or an allocation the file does not
//! back; what is read holds exactly the elements its header declares.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_worker::safetensors_file::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let path = tandem_fuzz::scratch("fuzz.safetensors");
    tandem_fuzz::put(&path, data);
    let Ok(file) = SafetensorsFile::open(&path) else { return };
    for name in file.names() {
        let shape = file.shape(&name).expect("a listed tensor has a shape").to_vec();
        assert!(file.dtype(&name).is_some() || file.tensor(&name).is_err(), "{name}: no dtype, yet read");
        if let Ok(t) = file.tensor(&name) {
            assert_eq!(t.shape(), shape.as_slice(), "{name}: shape read differs from the header");
        }
    }
});
