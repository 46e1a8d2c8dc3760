//! Running out of file descriptors. An accept that fails with EMFILE leaves
//! the connection in the listen queue: the client hangs, and the accept loop
//! wakes at once and fails again. So one descriptor is held in reserve: it is
//! freed to take the waiting connection off the queue and reset it (the
//! client learns at once, and the refusal is counted), then taken back.

use parking_lot::Mutex;
use std::{
    fs::File,
    io,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub struct DescriptorReserve {
    spare: Mutex<Option<File>>,
    /// When exhaustion was last logged (seconds since the epoch): a warning a
    /// second at most, however many connections are refused.
    last_warned: AtomicU64,
}

impl Default for DescriptorReserve {
    fn default() -> Self {
        Self {
            spare: Mutex::new(open_spare()),
            last_warned: AtomicU64::new(0),
        }
    }
}

fn open_spare() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Whether `err` means the process or the system has no descriptor left.
pub fn is_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl DescriptorReserve {
    /// Takes the connection waiting on `listener` off its queue with the
    /// reserve descriptor and resets it. False if there was none waiting or
    /// the reserve is in use (then the caller backs off).
    pub fn reset_waiting(&self, listener: &impl AsFd) -> bool {
        let mut spare = self.spare.lock();
        if spare.is_none() {
            *spare = open_spare();
        }
        let Some(file) = spare.take() else {
            return false;
        };
        drop(file);
        let reset = match socket2::SockRef::from(listener).accept() {
            Ok((connection, _)) => {
                // Linger 0: the close sends a RST, the client fails at once.
                let _ = connection.set_linger(Some(Duration::ZERO));
                true
            }
            Err(_) => false,
        };
        *spare = open_spare();
        reset
    }

    /// True at most once a second: whether to log this exhaustion.
    pub fn should_warn(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warned.load(Ordering::Relaxed);
        now != last
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_connection_is_reset_with_the_reserve_descriptor() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let reserve = DescriptorReserve::default();
        assert!(!reserve.reset_waiting(&listener), "nothing is waiting yet");
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !reserve.reset_waiting(&listener) {
            assert!(std::time::Instant::now() < deadline, "never reset");
            std::thread::sleep(Duration::from_millis(5));
        }
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        let err = std::io::Read::read(&mut client, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        // The reserve is back for the next one.
        assert!(reserve.spare.lock().is_some());
    }

    #[test]
    fn only_descriptor_errors_count_as_exhaustion() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhaustion(&io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
