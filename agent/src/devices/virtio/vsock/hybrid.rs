//! The host's end of Firecracker's hybrid-vsock handshake: connect to the VM's Unix
//! socket, write `CONNECT <port>\n`, read `OK <host-port>\n`. Tools written for
//! Firecracker do the same against a cleave VM.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one attempt waits for the device's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer line is `OK <u32>`; anything longer is not one.
const ANSWER_MAX: usize = 32;

/// One handshake: a stream to the guest's listener on `port`, or why not. A guest with
/// no listener on `port` closes the connection (reported as `ConnectionRefused`).
pub fn connect_once(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // One byte at a time: what follows the line belongs to the guest's stream.
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("the guest did not accept a connection on vsock port {port}"),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < ANSWER_MAX => line.push(byte[0]),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the vsock socket sent an overlong answer to CONNECT",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let ok = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .is_some_and(|p| p.parse::<u32>().is_ok());
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the vsock socket answered CONNECT with {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// [`connect_once`], retried until `deadline` (the guest may not be listening yet).
pub fn connect(socket: &Path, port: u32, deadline: Instant) -> io::Result<UnixStream> {
    loop {
        match connect_once(socket, port) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
