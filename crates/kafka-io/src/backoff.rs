//! Capped exponential backoff with jitter: the one helper every retry loop here uses, so no
//! loop retries at full speed and none waits unboundedly long between tries.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    init: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(init: Duration, max: Duration) -> Self {
        let init = init.max(Duration::from_millis(1));
        Self {
            init,
            max: max.max(init),
            next: init,
        }
    }

    /// The wait before the next try: doubles up to the cap, with up to 20% jitter taken off
    /// so members that failed together do not retry together.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = rand::random::<f64>() * 0.2;
        base.mul_f64(1.0 - jitter)
    }

    /// After a success: start again from the first wait.
    pub fn reset(&mut self) {
        self.next = self.init;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(450));
        let waits: Vec<Duration> = (0..5).map(|_| b.next_wait()).collect();
        for (w, base) in waits.iter().zip([100u64, 200, 400, 450, 450]) {
            let base = Duration::from_millis(base);
            assert!(*w <= base && *w >= base.mul_f64(0.8), "{w:?} vs {base:?}");
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
