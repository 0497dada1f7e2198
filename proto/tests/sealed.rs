//! The sealed raw streams of `tandem_proto::sealed` over real sockets: records cross both ways
//! between two holders of the cluster's certificates of the right roles; a client or server of
//! another CA, of the wrong role or with no TLS at all is refused at the handshake; a record
//! changed, replayed or too long on the wire fails to open.

#![allow(clippy::unwrap_used)] // tests unwrap by design

use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use tandem_proto::sealed::{self, Opener, Sealer};
use tandem_proto::tls::{CertificateAuthority, ClusterTls, Role};

fn holder(ca: &CertificateAuthority, role: Role, name: &str) -> ClusterTls {
    let issued = ca.issue(role, name).unwrap();
    ClusterTls::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
}

/// A server holding `server_tls` that requires a worker client, and a client holding
/// `client_tls` that requires a worker server, on one connection: each side's outcome.
#[allow(clippy::type_complexity)]
fn pair(
    server_tls: ClusterTls,
    client_tls: ClusterTls,
) -> (std::io::Result<(Sealer, Opener, TcpStream)>, std::io::Result<(Sealer, Opener, TcpStream)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        sealed::server(&mut stream, &server_tls, Role::Worker).map(|(s, o)| (s, o, stream))
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let client = match sealed::client(&mut stream, &client_tls, Role::Worker) {
        Ok((s, o)) => Ok((s, o, stream)),
        Err(e) => {
            // A refusing client hangs up, so the server's handshake ends too.
            drop(stream);
            Err(e)
        }
    };
    (server.join().unwrap(), client)
}

/// A holder of a certificate of `issuer` that trusts every CA of `trusted` (a `ca.pem` bundle).
fn holder_trusting(issuer: &CertificateAuthority, trusted: &[&CertificateAuthority], name: &str) -> ClusterTls {
    let issued = issuer.issue(Role::Worker, name).unwrap();
    let bundle: String = trusted.iter().map(|ca| ca.cert_pem()).collect();
    ClusterTls::from_pem(&bundle, &issued.cert_pem, &issued.key_pem)
}

#[test]
fn during_a_ca_rotation_ranks_of_the_old_and_the_new_ca_connect() {
    let (old, new) = (CertificateAuthority::create().unwrap(), CertificateAuthority::create().unwrap());
    let (server, client) = pair(holder_trusting(&old, &[&old, &new], "w1"), holder_trusting(&new, &[&old, &new], "w2"));
    assert!(server.is_ok() && client.is_ok());
    // Once the old CA has left the bundle, its certificates are refused.
    let (server, client) = pair(holder_trusting(&new, &[&new], "w1"), holder_trusting(&old, &[&old, &new], "w2"));
    assert!(server.is_err() || client.is_err());
}

#[test]
fn records_cross_both_ways_between_two_workers() {
    let ca = CertificateAuthority::create().unwrap();
    let (server, client) = pair(holder(&ca, Role::Worker, "w1"), holder(&ca, Role::Worker, "w2"));
    let (mut s_seal, mut s_open, mut s_stream) = server.unwrap();
    let (mut c_seal, mut c_open, mut c_stream) = client.unwrap();
    // The server first, as the module asks.
    for n in [0usize, 1, 5, 70_000] {
        let want: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        s_seal.write(&mut s_stream, &mut want.clone()).unwrap();
        assert_eq!(c_open.read(&mut c_stream, 1 << 20).unwrap(), want);
        c_seal.write(&mut c_stream, &mut want.clone()).unwrap();
        assert_eq!(s_open.read(&mut s_stream, 1 << 20).unwrap(), want);
    }
    // Too long for the reader: refused before it is read.
    s_seal.write(&mut s_stream, &mut vec![1u8; 100]).unwrap();
    assert_eq!(c_open.read(&mut c_stream, 99).unwrap_err().kind(), ErrorKind::InvalidData);
}

#[test]
fn a_changed_or_replayed_record_fails_to_open() {
    let ca = CertificateAuthority::create().unwrap();
    let (server, client) = pair(holder(&ca, Role::Worker, "w1"), holder(&ca, Role::Worker, "w2"));
    let (mut seal, _, _s_stream) = server.unwrap();
    let (_, mut open, _c_stream) = client.unwrap();
    let mut first = Vec::new();
    seal.write(&mut first, &mut b"first".to_vec()).unwrap();
    // Opened once; the same record again, in the next one's place, is refused.
    assert_eq!(open.read(&mut &first[..], 64).unwrap(), b"first");
    assert_eq!(open.read(&mut &first[..], 64).unwrap_err().kind(), ErrorKind::InvalidData);

    let ca = CertificateAuthority::create().unwrap();
    let (server, client) = pair(holder(&ca, Role::Worker, "w1"), holder(&ca, Role::Worker, "w2"));
    let (mut seal, _, _s) = server.unwrap();
    let (_, mut open, _c) = client.unwrap();
    let mut wire = Vec::new();
    seal.write(&mut wire, &mut b"payload".to_vec()).unwrap();
    let last = wire.len() - 1;
    wire[last] ^= 1;
    assert_eq!(open.read(&mut &wire[..], 64).unwrap_err().kind(), ErrorKind::InvalidData);
}

#[test]
fn only_workers_of_the_cluster_complete_the_handshake() {
    let ca = CertificateAuthority::create().unwrap();
    let other = CertificateAuthority::create().unwrap();
    // A client of another CA: the server refuses it.
    let (server, client) = pair(holder(&ca, Role::Worker, "w1"), holder(&other, Role::Worker, "w2"));
    assert!(server.is_err() && client.is_err());
    // A server of another CA: the client refuses it.
    let (server, client) = pair(holder(&other, Role::Worker, "w1"), holder(&ca, Role::Worker, "w2"));
    assert!(server.is_err() && client.is_err());
    // An operator's certificate is of the cluster, but not a worker's.
    let (server, client) = pair(holder(&ca, Role::Worker, "w1"), holder(&ca, Role::Operator, "op"));
    assert_eq!(server.err().unwrap().kind(), ErrorKind::PermissionDenied);
    drop(client);
    let (server, client) = pair(holder(&ca, Role::Coordinator, "1"), holder(&ca, Role::Worker, "w2"));
    assert!(client.is_err(), "a coordinator answered where a worker was dialled");
    drop(server);
    // No TLS at all: a plain-text peer gets no further than its first bytes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = holder(&ca, Role::Worker, "w1");
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        sealed::server(&mut stream, &tls, Role::Worker).err().unwrap()
    });
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.write_all(b"TNDMCOL1 hello from plain text, not TLS").unwrap();
    let err = server.join().unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidData, "{err}");
}
