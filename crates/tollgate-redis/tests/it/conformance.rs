//! The store conformance suite of tollgate-core, on Redis (caller's clock).

use tollgate_core::store::conformance as c;
use tollgate_redis::TimeSource;

use crate::support::{SHARED, assert_every_key_expires, shared_store};

macro_rules! redis_conformance {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let store = shared_store(stringify!($case), TimeSource::Caller).await;
            c::$case(&store).await;
            assert_every_key_expires(SHARED, store.prefix()).await;
        }
    )*};
}

redis_conformance!(
    rejected_request_consumes_nothing,
    non_blocking_checks_never_refuse,
    retry_after_is_exact,
    sliding_window_is_an_exact_log,
    approximate_sliding_window_is_late_by_at_most_a_sub_window,
    calendar_window_resets_at_its_end,
    leases_hold_until_released,
);
