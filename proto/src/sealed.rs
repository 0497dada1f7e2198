//! A raw TCP stream between two processes of the cluster under its certificates, for traffic
//! that gRPC does not carry (the collectives between ranks). A TLS 1.3 handshake (rustls, each
//! side showing a certificate of the cluster's CA) agrees on a key per direction; each direction
//! then seals whole records with its key on its own ([`Sealer`], [`Opener`]), so one thread may
//! write a connection while another reads it with no TLS state between them (the split kTLS
//! makes of a TLS connection).
//!
//! The server writes the first record after the handshake: the server's last handshake read
//! may take in whatever the client sent after its last handshake message, and that would be
//! lost with the TLS connection; the client, which finishes its handshake first, has stopped
//! reading by the time the server writes.
//!
//! A record on the wire: its length (u64 little-endian, also the AEAD's associated data), then
//! the ciphertext and tag. Nonces are the TLS 1.3 ones: the key's IV xor the record's number.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};
use rustls_pki_types::ServerName;

use crate::tls::{Caller, ClusterTls, Role};

/// Seals the records of one direction.
pub struct Sealer(Key);

/// Opens the records of one direction.
pub struct Opener(Key);

struct Key {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// Records sealed (or opened) so far.
    seq: u64,
}

impl Key {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Key> {
        let ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } = secrets else {
            return Err(io::Error::other("the handshake agreed on a cipher other than ChaCha20-Poly1305"));
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, key.as_ref()).map_err(|_| io::Error::other("bad key"))?;
        let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| io::Error::other("bad IV"))?;
        Ok(Key { key: LessSafeKey::new(key), iv, seq })
    }

    /// The next record's nonce; a key is never used for two records with one number.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

impl Sealer {
    /// Writes `record` sealed (`record` holds the ciphertext afterwards).
    pub fn write(&mut self, out: &mut impl Write, record: &mut Vec<u8>) -> io::Result<()> {
        let len = (record.len() + CHACHA20_POLY1305.tag_len()) as u64;
        let nonce = self.0.next_nonce();
        let aad = len.to_le_bytes();
        (self.0.key.seal_in_place_append_tag(nonce, Aad::from(aad), record))
            .map_err(|_| io::Error::other("cannot seal a record"))?;
        out.write_all(&aad)?;
        out.write_all(record)
    }
}

impl Opener {
    /// Reads and opens the next record, refusing one longer than `max` bytes: a forged,
    /// replayed, reordered or truncated record is an `InvalidData` error.
    pub fn read(&mut self, input: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
        let mut aad = [0u8; 8];
        input.read_exact(&mut aad)?;
        let len = u64::from_le_bytes(aad);
        let tag = CHACHA20_POLY1305.tag_len() as u64;
        if len < tag || len - tag > max as u64 {
            return Err(io::Error::new(ErrorKind::InvalidData, format!("a sealed record of {len} bytes")));
        }
        let mut record = vec![0u8; len as usize];
        input.read_exact(&mut record)?;
        let nonce = self.0.next_nonce();
        let plain = (self.0.key.open_in_place(nonce, Aad::from(aad), &mut record))
            .map_err(|_| io::Error::new(ErrorKind::InvalidData, "a record failed authentication"))?;
        let plain_len = plain.len();
        record.truncate(plain_len);
        Ok(record)
    }
}

/// Runs the client's side of the handshake on `stream`: the server must hold a certificate of
/// `server`'s role. The server writes first afterwards.
pub fn client(stream: &mut TcpStream, tls: &ClusterTls, server: Role) -> io::Result<(Sealer, Opener)> {
    let name = ServerName::try_from(server.dns_name()).map_err(io::Error::other)?;
    let conn = rustls::ClientConnection::new(tls.stream_client().map_err(io::Error::other)?, name);
    let conn = handshake(stream, conn.map_err(io::Error::other)?)?;
    keys(conn.dangerous_extract_secrets())
}

/// Runs the server's side of the handshake on `stream`: the client must hold a certificate of
/// `client`'s role. The server writes first afterwards.
pub fn server(stream: &mut TcpStream, tls: &ClusterTls, client: Role) -> io::Result<(Sealer, Opener)> {
    let conn = rustls::ServerConnection::new(tls.stream_server().map_err(io::Error::other)?);
    let conn = handshake(stream, conn.map_err(io::Error::other)?)?;
    let certs = conn.peer_certificates().unwrap_or_default();
    if !Caller::with_certs(certs).is(client, None) {
        return Err(io::Error::new(ErrorKind::PermissionDenied, format!("the client holds no {client} certificate")));
    }
    keys(conn.dangerous_extract_secrets())
}

/// Drives `conn` through its handshake, reading no further than the handshake's own messages.
fn handshake<C, D>(stream: &mut TcpStream, mut conn: C) -> io::Result<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let tls_error = |e: rustls::Error| io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}"));
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(stream)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if conn.read_tls(stream)? == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "the peer closed the connection in the TLS handshake",
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (an alert), as far as it still listens.
            let _ = conn.write_tls(stream);
            return Err(tls_error(e));
        }
    }
    while conn.wants_write() {
        conn.write_tls(stream)?;
    }
    Ok(conn)
}

fn keys(secrets: Result<ExtractedSecrets, rustls::Error>) -> io::Result<(Sealer, Opener)> {
    let ExtractedSecrets { tx, rx } = secrets.map_err(io::Error::other)?;
    Ok((Sealer(Key::new(tx)?), Opener(Key::new(rx)?)))
}
