//! The CPU a benchmark ran on, printed beside its figures (machines differ between runs). Its
//! own file, free of the rest of the crate, so `bench/gateway_at.sh` can build it into an
//! older commit too.

/// The CPU's model and vector extensions (`/proc/cpuinfo`) and the threads it offers.
pub fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name)?.split_once(':').map(|(_, v)| v.trim().to_string()))
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &&str| flags.split_whitespace().any(|x| x == *f);
    let vector: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"].into_iter().filter(has).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model} ({}), {threads} threads", vector.join(" "))
}
