//! Injected randomness: a tiny seedable PRNG behind a trait, so tests are
//! deterministic and production can seed from the process's random state.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of uniformly distributed 64-bit values. Not cryptographic: it is
/// only used to spread load.
pub trait Rng: Send {
    /// The next uniformly distributed value.
    fn next_u64(&mut self) -> u64;
}

impl<R: Rng + ?Sized> Rng for Box<R> {
    fn next_u64(&mut self) -> u64 {
        (**self).next_u64()
    }
}

/// SplitMix64 (Steele, Lea & Flood): one add and two multiply-xorshifts per
/// value, passes BigCrush, any seed (including 0) is fine.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator with a fixed seed (same seed, same sequence).
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from std's per-process random hasher keys mixed
    /// with the wall clock, so two proxies do not make identical choices.
    pub fn from_entropy() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self::new(RandomState::new().hash_one(t))
    }
}

impl Rng for SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

thread_local! {
    static THREAD_RNG: std::cell::RefCell<SplitMix64> =
        std::cell::RefCell::new(SplitMix64::from_entropy());
}

/// This thread's generator, seeded from entropy: for draws on the data
/// path (a route's backend, a source port) that need no shared state.
pub(crate) struct ThreadRng;

impl Rng for ThreadRng {
    fn next_u64(&mut self) -> u64 {
        THREAD_RNG.with(|rng| rng.borrow_mut().next_u64())
    }
}

/// A value uniformly distributed in `0..n` (`n > 0`), by Lemire's
/// multiply-shift; the bias is below n / 2^64, irrelevant here.
pub(crate) fn below<R: Rng + ?Sized>(rng: &mut R, n: u64) -> u64 {
    debug_assert!(n > 0, "below(0)");
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}
