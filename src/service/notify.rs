//! Readiness for systemd (`Type=notify`): one datagram to the socket named by `$NOTIFY_SOCKET`
//! (sd_notify(3)'s protocol). Outside systemd the variable is unset and nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (like `READY=1`) to the service manager; `Ok(false)` when not run by one.
pub fn send(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        // systemd may name a socket in Linux's abstract namespace, written with a leading '@'.
        Some(name) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract socket names exist only on Linux",
                ));
            }
        }
        None => {
            socket.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(true)
}
