//! Deterministic tests: a [`ManualClock`] and seeded [`SplitMix64`]s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;

const CLIENT_NODE: &str = "node-a";
const CLIENT_ZONE: &str = "zone-1";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Endpoint `ep-{n}` on a node and zone of its own (no locality effects).
fn ep(n: u16) -> Endpoint {
    ep_at(n, &format!("node-{n}"), "zone-far")
}

fn ep_at(n: u16, node: &str, zone: &str) -> Endpoint {
    Endpoint::new(
        format!("ep-{n}"),
        SocketAddr::from(([10, 0, 0, 1], 8000 + n)),
        node,
    )
    .with_zone(zone)
}

fn config(protocol: Protocol) -> ServiceConfig {
    ServiceConfig {
        protocol,
        locality: Locality::None,
        ..ServiceConfig::default()
    }
}

fn service(
    config: ServiceConfig,
    endpoints: Vec<Endpoint>,
    seed: u64,
) -> (Arc<ManualClock>, Service) {
    let clock = Arc::new(ManualClock::new(secs(1_000)));
    let mut svc = Service::new(
        config,
        ClientLocality::new(CLIENT_NODE, Some(CLIENT_ZONE)),
        clock.clone(),
        Box::new(SplitMix64::new(seed)),
    )
    .expect("valid config");
    svc.update_endpoints(endpoints);
    (clock, svc)
}

/// `n` picks without reporting anything; picks per endpoint id.
fn picks(svc: &mut Service, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let pick = svc.pick().expect("an endpoint");
        *out.entry(pick.id.to_string()).or_default() += 1;
    }
    out
}

fn count(picks: &BTreeMap<String, usize>, id: &str) -> usize {
    picks.get(id).copied().unwrap_or(0)
}

/// Reports `n` failed requests (503) to `id`.
fn fail(svc: &mut Service, id: &str, n: usize) {
    for _ in 0..n {
        let token = svc.start_request(id);
        svc.finish(token, ms(1), Outcome::Status(503));
    }
}

fn succeed(svc: &mut Service, id: &str) {
    let token = svc.start_request(id);
    svc.finish(token, ms(1), Outcome::Success);
}

fn endpoint_stats(svc: &Service, id: &str) -> EndpointStats {
    svc.stats()
        .endpoints
        .into_iter()
        .find(|e| e.id == id)
        .expect("endpoint present")
}

fn ejected(svc: &Service, id: &str) -> bool {
    endpoint_stats(svc, id).ejected
}

#[test]
fn splitmix64_matches_reference_sequence() {
    // Reference values of SplitMix64 seeded with 0.
    let mut rng = SplitMix64::new(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
}

#[test]
fn no_endpoints_fails_fast_and_counts() {
    let (_, mut svc) = service(config(Protocol::Tcp), vec![], 1);
    assert_eq!(svc.pick(), Err(PickError::NoHealthyEndpoint));
    svc.update_endpoints(vec![ep(1)]);
    assert!(svc.pick().is_ok());
    svc.update_endpoints(vec![]);
    assert_eq!(svc.pick(), Err(PickError::NoHealthyEndpoint));
    let stats = svc.stats();
    assert_eq!((stats.no_healthy_endpoint, stats.picks), (2, 1));
}

#[test]
fn tcp_even_spread_with_open_and_close() {
    let (_, mut svc) = service(config(Protocol::Tcp), vec![ep(1), ep(2), ep(3)], 11);
    let mut sim = SplitMix64::new(99);
    let mut open: Vec<ConnectionToken> = Vec::new();
    let mut worst_imbalance = 0;
    for _ in 0..30_000 {
        let pick = svc.pick().unwrap();
        open.push(svc.on_open(&pick.id));
        while open.len() > 20 {
            let i = rng::below(&mut sim, open.len() as u64) as usize;
            svc.on_close(open.swap_remove(i), Outcome::Success);
        }
        let loads: Vec<u64> = svc
            .stats()
            .endpoints
            .iter()
            .map(|e| e.open_connections)
            .collect();
        let spread = loads.iter().max().unwrap() - loads.iter().min().unwrap();
        worst_imbalance = worst_imbalance.max(spread);
    }
    for e in svc.stats().endpoints {
        // ±3% of a third: 10,000 ± 300.
        assert!(
            (9_700..=10_300).contains(&e.picks),
            "{} got {} picks",
            e.id,
            e.picks
        );
    }
    // Least-loaded selection keeps the open connections close together: 7–9
    // over 30 seeds, 14–16 with random selection (which passes the ±3% check).
    assert!(
        worst_imbalance <= 11,
        "open-connection spread reached {worst_imbalance}"
    );
}

#[test]
fn http_slow_endpoint_is_avoided() {
    let (clock, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2), ep(3)], 5);
    let latency = |id: &str| if id == "ep-3" { ms(50) } else { ms(1) };
    // A request every 250 µs, so fast endpoints have a few in flight too.
    let mut in_flight: Vec<(Duration, RequestToken, Duration)> = Vec::new();
    let (mut measured, mut slow) = (0, 0);
    for i in 0..41_000 {
        clock.advance(Duration::from_micros(250));
        let now = clock.now();
        let (done, pending): (Vec<_>, Vec<_>) =
            in_flight.into_iter().partition(|(at, _, _)| *at <= now);
        in_flight = pending;
        for (_, token, rtt) in done {
            svc.finish(token, rtt, Outcome::Success);
        }
        let pick = svc.pick().unwrap();
        let rtt = latency(&pick.id);
        in_flight.push((now + rtt, svc.start_request(&pick.id), rtt));
        if i >= 1_000 {
            measured += 1;
            slow += usize::from(&*pick.id == "ep-3");
        }
    }
    let share = slow as f64 / measured as f64;
    assert!(
        share < 0.05,
        "slow endpoint got {:.2}% of picks",
        share * 100.0
    );
    // It is still probed now and then (the estimate decays toward zero).
    assert!(slow > 0, "slow endpoint never re-probed");
    // τ = 10 s: after ~10 s of 1 ms samples the 30 ms default still weighs
    // about e^-1 (≈ 11 ms), and the slow endpoint's 50 ms peaks are far above.
    let fast = endpoint_stats(&svc, "ep-1").ewma;
    assert!(
        fast > ms(5) && fast < ms(12),
        "fast endpoint estimate {fast:?}"
    );
    eprintln!("slow share {:.3}% ({slow} picks)", share * 100.0);
}

/// The exact shares the end-to-end test leaves out (a busy machine moves
/// latency, and a latency-aware balancer rightly follows it): endpoints
/// answering alike, one request at a time, get a third each.
#[test]
fn http_equal_endpoints_share_evenly_one_request_at_a_time() {
    let (clock, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2), ep(3)], 11);
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..3_000 {
        clock.advance(ms(1));
        let pick = svc.pick().unwrap();
        let token = svc.start_request(&pick.id);
        clock.advance(ms(2));
        svc.finish(token, ms(2), Outcome::Success);
        *served.entry(pick.id.to_string()).or_default() += 1;
    }
    for id in ["ep-1", "ep-2", "ep-3"] {
        let share = count(&served, id) as f64 / 3_000.0;
        assert!(
            (0.28..=0.39).contains(&share),
            "{id} served {share:.3} (a third ± 0.05): {served:?}"
        );
    }
}

#[test]
fn failing_endpoint_is_ejected_readmitted_and_ejected_longer() {
    let (clock, mut svc) = service(config(Protocol::Tcp), vec![ep(1), ep(2), ep(3)], 3);
    fail(&mut svc, "ep-1", 4);
    assert!(!ejected(&svc, "ep-1"), "4 failures must not eject");
    fail(&mut svc, "ep-1", 1);
    assert!(ejected(&svc, "ep-1"));
    assert_eq!(svc.stats().ejections, 1);
    assert_eq!(count(&picks(&mut svc, 3_000), "ep-1"), 0);

    clock.advance(secs(29));
    assert_eq!(count(&picks(&mut svc, 1_000), "ep-1"), 0);
    clock.advance(secs(1));
    assert!(
        count(&picks(&mut svc, 3_000), "ep-1") > 500,
        "re-admitted after 30 s"
    );

    // On probation: a single failure ejects again, for 2 × 30 s.
    fail(&mut svc, "ep-1", 1);
    assert!(ejected(&svc, "ep-1"));
    assert_eq!(endpoint_stats(&svc, "ep-1").times_ejected, 2);
    clock.advance(secs(59));
    assert_eq!(count(&picks(&mut svc, 3_000), "ep-1"), 0);
    clock.advance(secs(1));
    assert!(
        count(&picks(&mut svc, 3_000), "ep-1") > 500,
        "re-admitted after 60 s"
    );

    // One success ends probation: it takes 5 failures again.
    succeed(&mut svc, "ep-1");
    fail(&mut svc, "ep-1", 4);
    assert!(!ejected(&svc, "ep-1"));
    assert_eq!(svc.stats().ejections, 2);
}

#[test]
fn ejection_backoff_is_capped_and_decays_while_healthy() {
    let mut cfg = config(Protocol::Tcp);
    cfg.outlier.max_ejection_time = secs(75);
    let (clock, mut svc) = service(cfg, vec![ep(1), ep(2), ep(3)], 3);
    fail(&mut svc, "ep-1", 5);
    clock.advance(secs(30));
    fail(&mut svc, "ep-1", 1); // 60 s
    clock.advance(secs(60));
    fail(&mut svc, "ep-1", 1); // 90 s, capped at 75 s
    clock.advance(secs(74));
    assert!(ejected(&svc, "ep-1"));
    clock.advance(secs(1));
    assert!(!ejected(&svc, "ep-1"));
    assert_eq!(endpoint_stats(&svc, "ep-1").times_ejected, 3);
    // Healthy for 3 × 30 s: the multiplier is back to 0, next ejection 30 s.
    succeed(&mut svc, "ep-1");
    clock.advance(secs(90));
    fail(&mut svc, "ep-1", 5);
    assert_eq!(endpoint_stats(&svc, "ep-1").times_ejected, 1);
    clock.advance(secs(30));
    assert!(!ejected(&svc, "ep-1"));
}

#[test]
fn max_ejection_percent_keeps_half_in_rotation() {
    let (_, mut svc) = service(config(Protocol::Tcp), vec![ep(1), ep(2)], 4);
    for _ in 0..10 {
        fail(&mut svc, "ep-1", 1);
        fail(&mut svc, "ep-2", 1);
    }
    let stats = svc.stats();
    let ejected_count = stats.endpoints.iter().filter(|e| e.ejected).count();
    assert_eq!(ejected_count, 1);
    assert_eq!(stats.ejections, 1);
    assert!(stats.ejections_suppressed >= 1);
    let survivor = stats
        .endpoints
        .iter()
        .find(|e| !e.ejected)
        .unwrap()
        .id
        .clone();
    assert_eq!(count(&picks(&mut svc, 1_000), &survivor), 1_000);
    assert_eq!(svc.stats().fallback_picks, 0);
}

#[test]
fn single_endpoint_is_never_ejected_at_50_percent() {
    let (_, mut svc) = service(config(Protocol::Tcp), vec![ep(1)], 4);
    fail(&mut svc, "ep-1", 20);
    assert!(!ejected(&svc, "ep-1"));
    assert!(svc.pick().is_ok());
}

#[test]
fn all_ejected_falls_back_instead_of_failing() {
    let mut cfg = config(Protocol::Tcp);
    cfg.outlier.max_ejection_percent = 100;
    let (_, mut svc) = service(cfg, vec![ep(1), ep(2)], 4);
    fail(&mut svc, "ep-1", 5);
    fail(&mut svc, "ep-2", 5);
    assert!(ejected(&svc, "ep-1") && ejected(&svc, "ep-2"));
    let got = picks(&mut svc, 1_000);
    assert!(count(&got, "ep-1") > 0 && count(&got, "ep-2") > 0);
    assert_eq!(svc.stats().fallback_picks, 1_000);
}

fn versioned(n: u16, version: &str) -> Endpoint {
    ep(n)
        .with_label("version", version)
        .with_label("app", "web")
}

fn canary_config() -> ServiceConfig {
    ServiceConfig {
        subsets: vec![
            Subset::new("v1", 95, [("version", "v1")]),
            Subset::new("v2", 5, [("version", "v2")]),
        ],
        ..config(Protocol::Http)
    }
}

#[test]
fn subsets_split_95_5() {
    let endpoints = vec![
        versioned(1, "v1"),
        versioned(2, "v1"),
        versioned(3, "v2"),
        versioned(4, "v2"),
    ];
    let (_, mut svc) = service(canary_config(), endpoints, 8);
    let got = picks(&mut svc, 20_000);
    let v2 = count(&got, "ep-3") + count(&got, "ep-4");
    let share = v2 as f64 / 20_000.0;
    // σ = sqrt(0.05 · 0.95 / 20000) ≈ 0.154%; ±0.6% is ≈ 3.9σ.
    assert!(
        (share - 0.05).abs() <= 0.006,
        "v2 share {:.3}%",
        share * 100.0
    );
    // Both endpoints of each subset are used.
    assert!(got.values().all(|&n| n > 300), "{got:?}");
}

#[test]
fn subset_without_healthy_endpoint_sends_its_share_elsewhere() {
    let endpoints = vec![versioned(1, "v1"), versioned(2, "v1"), versioned(3, "v2")];
    let (_, mut svc) = service(canary_config(), endpoints, 8);
    fail(&mut svc, "ep-3", 5);
    assert!(ejected(&svc, "ep-3"));
    assert_eq!(count(&picks(&mut svc, 5_000), "ep-3"), 0);
    assert_eq!(svc.stats().fallback_picks, 0);
    // A subset with no endpoints at all behaves the same.
    svc.update_endpoints(vec![versioned(1, "v1")]);
    assert_eq!(count(&picks(&mut svc, 1_000), "ep-1"), 1_000);
    // No subset matches anything: the whole service is used.
    svc.update_endpoints(vec![ep(7)]);
    assert_eq!(count(&picks(&mut svc, 10), "ep-7"), 10);
}

#[test]
fn endpoint_weights_bias_p2c() {
    let (_, mut svc) = service(
        config(Protocol::Tcp),
        vec![ep(1).with_weight(3), ep(2), ep(3).with_weight(0)],
        21,
    );
    // Idle endpoints (every connection closed at once): weight-proportional.
    let mut heavy = 0;
    for _ in 0..20_000 {
        let pick = svc.pick().unwrap();
        heavy += usize::from(&*pick.id == "ep-1");
        let token = svc.on_open(&pick.id);
        svc.on_close(token, Outcome::Success);
    }
    let share = heavy as f64 / 20_000.0;
    assert!((share - 0.75).abs() < 0.02, "weight-3 share {share}");
    assert_eq!(
        endpoint_stats(&svc, "ep-3").picks,
        0,
        "weight 0 is never picked"
    );
    // Only weight-0 endpoints left: they are used rather than failing.
    svc.update_endpoints(vec![ep(3).with_weight(0)]);
    assert!(svc.pick().is_ok());
}

fn locality_endpoints() -> Vec<Endpoint> {
    vec![
        ep_at(1, CLIENT_NODE, CLIENT_ZONE),
        ep_at(2, "node-b", CLIENT_ZONE),
        ep_at(3, "node-c", "zone-2"),
        ep_at(4, "node-d", CLIENT_ZONE),
    ]
}

#[test]
fn locality_prefers_node_then_zone_then_any() {
    let cfg = ServiceConfig {
        locality: Locality::PreferNode,
        outlier: OutlierConfig {
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        },
        ..config(Protocol::Tcp)
    };
    let (_, mut svc) = service(cfg, locality_endpoints(), 2);
    assert_eq!(count(&picks(&mut svc, 1_000), "ep-1"), 1_000);

    fail(&mut svc, "ep-1", 5);
    let got = picks(&mut svc, 1_000);
    assert_eq!(count(&got, "ep-2") + count(&got, "ep-4"), 1_000, "{got:?}");
    assert!(count(&got, "ep-2") > 300 && count(&got, "ep-4") > 300);

    fail(&mut svc, "ep-2", 5);
    fail(&mut svc, "ep-4", 5);
    assert_eq!(count(&picks(&mut svc, 1_000), "ep-3"), 1_000);

    // Everything ejected: ejection is ignored, locality still applies.
    fail(&mut svc, "ep-3", 5);
    assert_eq!(count(&picks(&mut svc, 1_000), "ep-1"), 1_000);
}

#[test]
fn locality_prefer_zone_and_none() {
    let cfg = ServiceConfig {
        locality: Locality::PreferZone,
        ..config(Protocol::Tcp)
    };
    let (_, mut svc) = service(cfg, locality_endpoints(), 2);
    let got = picks(&mut svc, 3_000);
    assert_eq!(count(&got, "ep-3"), 0);
    assert!(
        ["ep-1", "ep-2", "ep-4"]
            .iter()
            .all(|id| count(&got, id) > 800),
        "{got:?}"
    );

    let (_, mut svc) = service(config(Protocol::Tcp), locality_endpoints(), 2);
    let got = picks(&mut svc, 4_000);
    assert!(got.values().all(|&n| n > 800), "{got:?}");
}

#[test]
fn retry_budget_ratio_and_sliding_window() {
    let clock = Arc::new(ManualClock::new(secs(1_000)));
    let cfg = RetryBudgetConfig {
        ratio: 0.2,
        min_retries_per_second: 0,
        ..RetryBudgetConfig::default()
    };
    let mut budget = RetryBudget::new(cfg, clock.clone()).unwrap();
    for _ in 0..100 {
        budget.record_request();
    }
    for i in 1..=20 {
        assert!(budget.try_retry(), "retry {i} should be allowed");
    }
    assert!(!budget.try_retry(), "the 21st retry is denied");
    assert!(!budget.try_retry());

    // 9.999 s later the requests and retries are still in the window.
    clock.advance(Duration::from_millis(9_999));
    assert!(!budget.try_retry());
    // The window has slid past them: new traffic earns new retries.
    clock.advance(ms(1));
    for _ in 0..10 {
        budget.record_request();
    }
    assert!(budget.try_retry());
    assert!(budget.try_retry());
    assert!(!budget.try_retry());
    assert_eq!(
        budget.stats(),
        RetryStats {
            allowed: 22,
            denied: 4
        }
    );
}

#[test]
fn retry_budget_slides_per_bucket() {
    let clock = Arc::new(ManualClock::new(secs(1_000)));
    let cfg = RetryBudgetConfig {
        min_retries_per_second: 0,
        ..RetryBudgetConfig::default()
    };
    let mut budget = RetryBudget::new(cfg, clock.clone()).unwrap();
    for _ in 0..50 {
        budget.record_request();
    }
    clock.advance(secs(5));
    for _ in 0..50 {
        budget.record_request();
    }
    for _ in 0..20 {
        assert!(budget.try_retry());
    }
    assert!(!budget.try_retry());
    // The first 50 requests leave the window; the 20 retries are still in.
    clock.advance(secs(5));
    assert!(!budget.try_retry());
    // ... until they leave too; 50 requests remain in neither: nothing left.
    clock.advance(secs(5));
    assert!(!budget.try_retry());
    for _ in 0..5 {
        budget.record_request();
    }
    assert!(budget.try_retry());
}

#[test]
fn retry_budget_minimum_without_traffic() {
    let clock = Arc::new(ManualClock::new(secs(0)));
    let mut budget = RetryBudget::new(RetryBudgetConfig::default(), clock).unwrap();
    // 10/s × 10 s = 100 retries with no requests at all.
    assert_eq!((0..150).filter(|_| budget.try_retry()).count(), 100);
    assert_eq!(
        budget.stats(),
        RetryStats {
            allowed: 100,
            denied: 50
        }
    );
}

#[test]
fn retry_budget_rejects_bad_config() {
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let bad = |cfg: RetryBudgetConfig| RetryBudget::new(cfg, clock.clone()).is_err();
    assert!(bad(RetryBudgetConfig {
        ratio: -1.0,
        ..Default::default()
    }));
    assert!(bad(RetryBudgetConfig {
        ratio: f64::NAN,
        ..Default::default()
    }));
    assert!(bad(RetryBudgetConfig {
        buckets: 0,
        ..Default::default()
    }));
    assert!(bad(RetryBudgetConfig {
        window: Duration::ZERO,
        ..Default::default()
    }));
}

#[test]
fn retryable_methods_and_outcomes() {
    for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
        assert!(retryable(method, &Outcome::ConnectFailed), "{method}");
        assert!(retryable(method, &Outcome::Status(503)), "{method}");
        assert!(!retryable(method, &Outcome::Status(500)), "{method}");
        assert!(!retryable(method, &Outcome::Status(502)), "{method}");
        assert!(!retryable(method, &Outcome::Failed), "{method}");
        assert!(!retryable(method, &Outcome::Success), "{method}");
    }
    for method in ["POST", "PATCH", "CONNECT", "get"] {
        assert!(!retryable(method, &Outcome::ConnectFailed), "{method}");
        assert!(!retryable(method, &Outcome::Status(503)), "{method}");
    }
}

#[test]
fn outcome_failure_classification() {
    assert!(!Outcome::Success.is_failure());
    assert!(!Outcome::Status(404).is_failure());
    assert!(!Outcome::Status(499).is_failure());
    assert!(Outcome::Status(500).is_failure());
    assert!(Outcome::Status(503).is_failure());
    assert!(Outcome::ConnectFailed.is_failure());
    assert!(Outcome::Failed.is_failure());
}

#[test]
fn peak_ewma_peaks_and_decays() {
    let cfg = EwmaConfig::default();
    let t0 = secs(100);
    let mut e = ewma::PeakEwma::new(&cfg, t0);
    assert_eq!(e.peek(t0), 30e6);
    // A higher sample replaces the estimate at once.
    e.observe(ms(200), t0);
    assert_eq!(e.peek(t0), 200e6);
    // Without samples it decays toward zero with τ = 10 s.
    let after_tau = e.peek(t0 + secs(10));
    assert!(
        (after_tau - 200e6 / std::f64::consts::E).abs() < 1.0,
        "{after_tau}"
    );
    // A lower sample is blended by the time since the last touch.
    e.observe(ms(10), t0 + secs(10));
    let w = (-1.0f64).exp();
    let expected = 200e6 * w + 10e6 * (1.0 - w);
    assert!((e.peek(t0 + secs(10)) - expected).abs() < 1.0);
    // Failures never lower it, not even by the passing of time...
    let before = e.peek(t0 + secs(10));
    e.observe_failure(ms(1), t0 + secs(20));
    assert_eq!(e.peek(t0 + secs(20)), before);
    // ... but may raise it.
    e.observe_failure(ms(900), t0 + secs(20));
    assert_eq!(e.peek(t0 + secs(20)), 900e6);
}

#[test]
fn fast_failures_do_not_attract_traffic() {
    let (clock, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2)], 6);
    for _ in 0..4 {
        // ep-1 fails in 1 µs (below the ejection threshold each time).
        let token = svc.start_request("ep-1");
        svc.finish(token, Duration::from_micros(1), Outcome::Status(500));
        let token = svc.start_request("ep-2");
        svc.finish(token, ms(10), Outcome::Success);
        clock.advance(secs(1));
    }
    let e1 = endpoint_stats(&svc, "ep-1").ewma;
    let e2 = endpoint_stats(&svc, "ep-2").ewma;
    assert!(e1 > e2, "failing endpoint looks cheaper: {e1:?} vs {e2:?}");
}

#[test]
fn update_endpoints_keeps_state_and_drops_removed() {
    let (clock, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2), ep(3)], 9);
    let token = svc.start_request("ep-2");
    clock.advance(ms(50));
    svc.finish(token, ms(50), Outcome::Success);
    fail(&mut svc, "ep-1", 5);
    assert!(ejected(&svc, "ep-1"));
    let ewma_before = endpoint_stats(&svc, "ep-2").ewma;
    assert_eq!(ewma_before, ms(50));
    let in_flight = svc.start_request("ep-3");
    let open = svc.on_open("ep-3");

    svc.update_endpoints(vec![ep(1), ep(2).with_weight(2), ep(4)]);
    assert_eq!(endpoint_stats(&svc, "ep-2").ewma, ewma_before, "EWMA kept");
    assert!(ejected(&svc, "ep-1"), "ejection kept");
    assert_eq!(
        endpoint_stats(&svc, "ep-4").ewma,
        ms(30),
        "new endpoint starts at the default RTT"
    );
    assert!(svc.stats().endpoints.iter().all(|e| e.id != "ep-3"));
    assert_eq!(count(&picks(&mut svc, 10_000), "ep-3"), 0);

    // Tokens of a removed endpoint complete quietly...
    svc.finish(in_flight, ms(5), Outcome::Status(503));
    svc.on_close(open, Outcome::ConnectFailed);
    // ... and do not touch a new incarnation under the same id.
    let stale = svc.start_request("ep-3");
    assert!(svc.stats().endpoints.iter().all(|e| e.id != "ep-3"));
    svc.update_endpoints(vec![ep(2), ep(3)]);
    let fresh = svc.start_request("ep-3");
    svc.finish(stale, ms(999), Outcome::Status(503));
    let e3 = endpoint_stats(&svc, "ep-3");
    assert_eq!((e3.pending_requests, e3.consecutive_failures), (1, 0));
    assert_eq!(e3.ewma, ms(30));
    svc.finish(fresh, ms(5), Outcome::Success);
    assert_eq!(endpoint_stats(&svc, "ep-3").pending_requests, 0);
}

#[test]
fn config_validation() {
    let ok = ServiceConfig::default();
    assert!(ok.validate().is_ok());
    let zero_subsets = ServiceConfig {
        subsets: vec![Subset::new("a", 0, [("v", "1")])],
        ..ServiceConfig::default()
    };
    assert_eq!(zero_subsets.validate(), Err(ConfigError::SubsetWeights));
    let mut bad = ServiceConfig::default();
    bad.outlier.max_ejection_percent = 101;
    assert_eq!(bad.validate(), Err(ConfigError::EjectionPercent(101)));
    let mut bad = ServiceConfig::default();
    bad.outlier.consecutive_failures = 0;
    assert_eq!(bad.validate(), Err(ConfigError::ConsecutiveFailures));
    let mut bad = ServiceConfig::default();
    bad.ewma.decay = Duration::ZERO;
    assert_eq!(bad.validate(), Err(ConfigError::EwmaDecay));
}

#[test]
fn balancer_types_can_be_shared_behind_a_mutex() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Service>();
    send::<RetryBudget>();
    send_sync::<parking_lot::Mutex<Service>>();
    send_sync::<ManualClock>();
    send_sync::<MonotonicClock>();
}

#[test]
fn monotonic_clock_moves_forward() {
    let clock = MonotonicClock::new();
    let a = clock.now();
    assert!(clock.now() >= a);
    let manual = ManualClock::new(secs(5));
    manual.set(secs(1));
    assert_eq!(manual.now(), secs(5), "never backwards");
    manual.advance(ms(1));
    assert_eq!(manual.now(), secs(5) + ms(1));
}

#[test]
fn a_retry_avoids_the_endpoints_it_failed_on_while_others_remain() {
    let (_, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2), ep(3)], 7);
    let failed: Vec<Arc<str>> = vec![Arc::from("ep-1")];
    for _ in 0..500 {
        let pick = svc.pick_avoiding(&failed).expect("an endpoint");
        assert_ne!(
            &*pick.id, "ep-1",
            "a retry went back to the endpoint that failed"
        );
    }
    // Every endpoint already tried: the pick still succeeds (a retry is better
    // than a certain failure), among all of them.
    let all: Vec<Arc<str>> = ["ep-1", "ep-2", "ep-3"].map(Arc::from).to_vec();
    let seen: std::collections::BTreeSet<String> = (0..300)
        .map(|_| svc.pick_avoiding(&all).expect("an endpoint").id.to_string())
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn a_cancelled_request_leaves_no_load_and_no_latency_sample() {
    let (_, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2)], 3);
    let before = endpoint_stats(&svc, "ep-1");
    let token = svc.start_request("ep-1");
    assert_eq!(endpoint_stats(&svc, "ep-1").pending_requests, 1);
    svc.cancel(token);
    let after = endpoint_stats(&svc, "ep-1");
    assert_eq!(after.pending_requests, 0);
    assert_eq!(after.ewma, before.ewma, "no sample recorded");
    assert_eq!(after.consecutive_failures, 0);
}

#[test]
fn an_unsampled_request_counts_its_outcome_but_not_its_latency() {
    let (_, mut svc) = service(config(Protocol::Http), vec![ep(1), ep(2)], 3);
    let before = endpoint_stats(&svc, "ep-1");
    let token = svc.start_request("ep-1");
    svc.finish_unsampled(token, Outcome::Status(503));
    let after = endpoint_stats(&svc, "ep-1");
    assert_eq!(after.pending_requests, 0);
    assert_eq!(after.ewma, before.ewma, "no latency sample");
    assert_eq!(after.consecutive_failures, 1, "the failure counts");
    // A slow first response on a new connection would otherwise have
    // made the endpoint look slow for many seconds.
    let token = svc.start_request("ep-1");
    svc.finish_unsampled(token, Outcome::Status(200));
    assert_eq!(endpoint_stats(&svc, "ep-1").ewma, before.ewma);
    assert_eq!(endpoint_stats(&svc, "ep-1").consecutive_failures, 0);
}

#[test]
fn round_robin_takes_turns_in_proportion_to_weight_whatever_the_load() {
    let config = ServiceConfig {
        choice: Choice::RoundRobin,
        ..config(Protocol::Http)
    };
    let (_, mut svc) = service(config.clone(), vec![ep(1), ep(2), ep(3)], 1);
    // ep-1 is loaded (requests pending): round robin does not look.
    for _ in 0..10 {
        let _ = svc.start_request("ep-1");
    }
    let order: Vec<String> = (0..9).map(|_| svc.pick().unwrap().id.to_string()).collect();
    for turn in order.chunks(3) {
        let mut turn = turn.to_vec();
        turn.sort();
        assert_eq!(turn, ["ep-1", "ep-2", "ep-3"], "{order:?}");
    }
    let shares = picks(&mut svc, 300);
    assert_eq!(
        [
            count(&shares, "ep-1"),
            count(&shares, "ep-2"),
            count(&shares, "ep-3")
        ],
        [100, 100, 100]
    );

    // Weights 5:1, spread out: b's turn comes once every six picks, and
    // never two a's more than five in a row.
    let (_, mut svc) = service(config, vec![ep(1).with_weight(5), ep(2).with_weight(1)], 1);
    let order: Vec<String> = (0..60)
        .map(|_| svc.pick().unwrap().id.to_string())
        .collect();
    for six in order.chunks(6) {
        assert_eq!(
            six.iter().filter(|id| *id == "ep-2").count(),
            1,
            "{order:?}"
        );
    }
}

#[test]
fn random_draws_in_proportion_to_weight_whatever_the_load() {
    let config = ServiceConfig {
        choice: Choice::Random,
        ..config(Protocol::Http)
    };
    let (_, mut svc) = service(config, vec![ep(1), ep(2), ep(3).with_weight(2)], 9);
    for _ in 0..10 {
        let _ = svc.start_request("ep-1");
    }
    // 40,000 draws: a quarter, a quarter, a half, each within 4σ.
    let shares = picks(&mut svc, 40_000);
    for (id, p) in [("ep-1", 0.25), ("ep-2", 0.25), ("ep-3", 0.5)] {
        let expected = 40_000.0 * p;
        let variance: f64 = 40_000.0 * p * (1.0 - p);
        let got = count(&shares, id) as f64;
        assert!(
            (got - expected).abs() <= 4.0 * variance.sqrt(),
            "{id}: {got} of 40,000 ({shares:?})"
        );
    }
}
