//! The wall clock jumping under a running mesh: forward past every
//! certificate's expiry, then back before the certificates minted meanwhile
//! began. The agents must mint again at once each time, new connections
//! must keep working, open ones carry on, and nothing panics.
//!
//! This moves the machine's clock (CLOCK_REALTIME; timers and timeouts use
//! the monotonic clock and are not affected), so this file holds this one
//! test: cargo runs test binaries one at a time, so nothing else runs
//! meanwhile. The clock is put back when the test ends, panics included.

use std::{net::IpAddr, time::Duration};

use mesh_e2e::{
    echo::{echo_once, start_chatty_connection},
    mesh::{TestCa, node_issuers, start_mesh_with},
};
use mesh_testbed::{Topology, e2e_enabled, traffic::TrafficServer, wait_until};

const PORT: u16 = 7500;
/// Longer than the certificates' lifetime (2 minutes), so a jump forward
/// expires them all and a jump back puts those minted meanwhile before their
/// start (they are backdated by one minute only).
const JUMP_SECS: i64 = 5 * 60;

/// The realtime clock moved by `offset` seconds; moved back on drop.
struct MovedClock {
    offset: i64,
}

impl MovedClock {
    fn new() -> Self {
        Self { offset: 0 }
    }

    fn jump(&mut self, secs: i64) {
        shift_realtime(secs);
        self.offset += secs;
    }
}

impl Drop for MovedClock {
    fn drop(&mut self) {
        if self.offset != 0 {
            shift_realtime(-self.offset);
        }
    }
}

/// Moves CLOCK_REALTIME by `secs` from wherever it is now, so the time that
/// passes is kept.
fn shift_realtime(secs: i64) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime/clock_settime read or write the struct given.
    unsafe {
        assert_eq!(libc::clock_gettime(libc::CLOCK_REALTIME, &mut now), 0);
        now.tv_sec += secs;
        let rc = libc::clock_settime(libc::CLOCK_REALTIME, &now);
        assert_eq!(
            rc,
            0,
            "setting the clock (needs CAP_SYS_TIME): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn the_clock_jumping_forward_and_back_under_traffic() {
    if !e2e_enabled("the_clock_jumping_forward_and_back_under_traffic") {
        return;
    }
    let topo = Topology::builder("clockjump")
        .node("n1", &["a"])
        .node("n2", &["c"])
        .build()
        .unwrap();
    let (a, c) = (topo.pod("a"), topo.pod("c"));
    let _server = TrafficServer::start(c, PORT).unwrap();
    let ca = TestCa::new(&topo, "clock").unwrap();
    let issuers = node_issuers(&topo, &ca).unwrap();
    // Certificates of two minutes, renewed at half; pooled tunnel
    // connections that idle a second are closed, so new connections make
    // new handshakes with the certificates of the moment.
    let agents = start_mesh_with(&topo, &issuers, "2m", "tunnel:\n  idleTimeout: 1s\n").unwrap();
    let c_ip = IpAddr::V4(c.ipv4());
    echo_once(a, c_ip, PORT).unwrap();
    let mut chatty = start_chatty_connection(a, c_ip, PORT);
    let serials = |agent: &mesh_e2e::NodeAgent| -> Vec<String> {
        agent
            .status()
            .unwrap()
            .certificates
            .iter()
            .map(|c| c.serial.clone())
            .collect()
    };
    let mut clock = MovedClock::new();

    for (what, by) in [("forward", JUMP_SECS), ("back", -JUMP_SECS)] {
        let before: Vec<Vec<String>> = agents.iter().map(serials).collect();
        clock.jump(by);
        // Each agent mints again (the old certificates are expired, or not
        // yet valid), within its half-second look at them.
        for (agent, old) in agents.iter().zip(&before) {
            wait_until(
                &format!("new certificates after the jump {what}"),
                Duration::from_secs(10),
                || Ok(serials(agent).iter().all(|s| !old.contains(s))),
            )
            .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
        }
        wait_until(
            &format!("new connections after the jump {what}"),
            Duration::from_secs(15),
            || Ok(echo_once(a, c_ip, PORT).is_ok()),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", agents[0].log(), agents[1].log()));
        assert!(
            chatty.try_status().unwrap().is_none(),
            "the open connection broke after the jump {what}: {}",
            chatty.output_report()
        );
    }
    drop(clock);
    echo_once(a, c_ip, PORT).unwrap();
}
