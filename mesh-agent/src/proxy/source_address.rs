//! Which address a delivery into a pod comes from: the client's own
//! (`preserveSourceAddress`, the default), or the agent's reserved loopback
//! address where the client's cannot be used, counted by reason.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde::Serialize;

/// How long a port whose listener did not answer a delivery from a client's
/// address gets deliveries from the agent's address before the client's is
/// tried again.
pub const NO_ANSWER_HOLD: Duration = Duration::from_secs(60);

/// Why a delivery came from the agent's address instead of the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The pod's routing for it could not be set up (or it is turned off).
    PodNotSetUp,
    /// The listener did not answer: an application that marks its own
    /// sockets (SO_MARK) sends its replies by its own routing.
    NoAnswer,
    /// The client's address is of the other family than the destination.
    OtherFamily,
}

impl Fallback {
    pub const ALL: [Fallback; 3] = [Self::PodNotSetUp, Self::NoAnswer, Self::OtherFamily];

    pub fn as_label(self) -> &'static str {
        match self {
            Self::PodNotSetUp => "pod_not_set_up",
            Self::NoAnswer => "no_answer",
            Self::OtherFamily => "other_family",
        }
    }
}

/// A pod's deliveries: whether they can come from clients' addresses, the
/// ports held back from it, and the fallbacks counted.
pub struct SourceAddress {
    /// Why deliveries come from the agent's address; None when they come
    /// from the client's.
    unavailable: Option<String>,
    no_answer: Mutex<HashMap<u16, Instant>>,
    fallbacks: [AtomicU64; 3],
}

/// What `/status` shows of a pod's deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceAddressView {
    /// Deliveries come from the client's address.
    pub preserved: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Deliveries made from the agent's address, by reason.
    pub fallbacks: HashMap<String, u64>,
}

impl SourceAddress {
    /// Deliveries from clients' addresses, the pod being set up for them.
    pub fn preserved() -> Self {
        Self::new(None)
    }

    /// Deliveries from the agent's address, for `reason`.
    pub fn unavailable(reason: String) -> Self {
        Self::new(Some(reason))
    }

    fn new(unavailable: Option<String>) -> Self {
        Self {
            unavailable,
            no_answer: Mutex::default(),
            fallbacks: Default::default(),
        }
    }

    /// The address a delivery of `client` to `port` should come from, or
    /// why it comes from the agent's (counted).
    pub fn source_for(
        &self,
        client: IpAddr,
        dst: std::net::SocketAddr,
    ) -> Result<IpAddr, Fallback> {
        let choice = self.choose(client, dst);
        if let Err(fallback) = choice {
            self.count(fallback);
        }
        choice
    }

    fn choose(&self, client: IpAddr, dst: std::net::SocketAddr) -> Result<IpAddr, Fallback> {
        if self.unavailable.is_some() {
            return Err(Fallback::PodNotSetUp);
        }
        let client = match client {
            IpAddr::V6(v6) if dst.is_ipv4() => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .ok_or(Fallback::OtherFamily)?,
            other if other.is_ipv4() != dst.is_ipv4() => return Err(Fallback::OtherFamily),
            other => other,
        };
        let mut held = self.no_answer.lock();
        if let Some(until) = held.get(&dst.port()) {
            if Instant::now() < *until {
                return Err(Fallback::NoAnswer);
            }
            held.remove(&dst.port());
        }
        Ok(client)
    }

    /// The listener on `port` did not answer a delivery from a client's
    /// address: deliveries to it come from the agent's for a while.
    pub fn no_answer(&self, port: u16) {
        self.no_answer
            .lock()
            .insert(port, Instant::now() + NO_ANSWER_HOLD);
        self.count(Fallback::NoAnswer);
    }

    fn count(&self, fallback: Fallback) {
        let index = Fallback::ALL
            .iter()
            .position(|f| *f == fallback)
            .unwrap_or(0);
        self.fallbacks[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn view(&self) -> SourceAddressView {
        SourceAddressView {
            preserved: self.unavailable.is_none(),
            reason: self.unavailable.clone(),
            fallbacks: Fallback::ALL
                .iter()
                .zip(&self.fallbacks)
                .map(|(f, n)| (f.as_label().to_string(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_address_is_used_unless_the_pod_port_or_family_says_otherwise() {
        let ok = SourceAddress::preserved();
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(ok.source_for(v4, dst("10.0.1.2:80")), Ok(v4));
        assert_eq!(ok.source_for(v6, dst("[fd00::2]:80")), Ok(v6));
        // An IPv4 client seen on an IPv6 socket is IPv4.
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(ok.source_for(mapped, dst("10.0.1.2:80")), Ok(v4));
        assert_eq!(
            ok.source_for(v6, dst("10.0.1.2:80")),
            Err(Fallback::OtherFamily)
        );
        assert_eq!(
            ok.source_for(v4, dst("[fd00::2]:80")),
            Err(Fallback::OtherFamily)
        );
        // A port whose listener did not answer is held back; others are not.
        ok.no_answer(80);
        assert_eq!(
            ok.source_for(v4, dst("10.0.1.2:80")),
            Err(Fallback::NoAnswer)
        );
        assert_eq!(ok.source_for(v4, dst("10.0.1.2:81")), Ok(v4));
        let view = ok.view();
        assert!(view.preserved);
        assert_eq!(view.fallbacks["other_family"], 2);
        assert_eq!(
            view.fallbacks["no_answer"], 2,
            "the miss and the held delivery"
        );
        assert_eq!(view.fallbacks["pod_not_set_up"], 0);

        let off = SourceAddress::unavailable("turned off".into());
        assert_eq!(
            off.source_for(v4, dst("10.0.1.2:80")),
            Err(Fallback::PodNotSetUp)
        );
        assert_eq!(off.view().reason.as_deref(), Some("turned off"));
        assert!(!off.view().preserved);
    }

    #[test]
    fn a_held_port_is_tried_again_once_the_hold_is_over() {
        let pod = SourceAddress::preserved();
        let client: IpAddr = "10.0.0.5".parse().unwrap();
        pod.no_answer(80);
        // As if the hold had ended.
        pod.no_answer
            .lock()
            .insert(80, Instant::now() - Duration::from_millis(1));
        assert_eq!(pod.source_for(client, dst("10.0.1.2:80")), Ok(client));
        assert!(pod.no_answer.lock().is_empty());
    }
}
