//! Decisions whose limits live in several Cluster hash slots.
//!
//! One script call cannot span slots, so the checks are grouped by scope
//! (one hash tag, one slot) and the groups are decided in turn, each
//! atomically by `decide.lua`:
//!
//! 1. While every group so far admitted, the next group is decided for real
//!    (it takes its cost only if all its blocking checks admit).
//! 2. Once a group refuses, the remaining groups are only *probed*: the same
//!    script with one extra check that always refuses, so it evaluates every
//!    counter (the numbers for the headers) and writes nothing.
//! 3. If the request ends refused (or a later call fails), `refund.lua` gives
//!    back, in every group that took its cost, what each of its admitting
//!    checks took: the request consumes nothing, as on one slot.
//!
//! What this does not make atomic: between a group's take and its refund (one
//! round trip per later group), the taken units are not available to other
//! requests, which may be refused meanwhile (under-admission, never
//! over-admission). A refund that cannot reach its node leaves the cost taken
//! (under-admission by that request's cost until the counter refills). See
//! `scripts/refund.lua` for what each algorithm gives back exactly.

use std::sync::LazyLock;

use redis::{Script, Value};
use tollgate_core::algorithm::Evaluation;
use tollgate_core::{Check, StoreError};

use super::{MAX_CHECKS, RedisStore, add_check, params_of, parse_reply};

/// Gives back what `decide.lua` took in one slot.
static REFUND: LazyLock<Script> = LazyLock::new(|| Script::new(crate::REFUND_SCRIPT));

/// A group of checks of one scope, in the order they first appear.
#[derive(Clone, Copy)]
struct Group {
    idx: [usize; MAX_CHECKS],
    len: usize,
}

impl RedisStore {
    /// Decides `checks[..n]` (several scopes, Cluster) as described in the
    /// module docs: all-or-nothing as seen after the call returns.
    pub(super) async fn decide_cross_slot(
        &self,
        now: &str,
        owner: &str,
        checks: &[Check],
        n: usize,
        out: &mut [Evaluation],
    ) -> Result<bool, StoreError> {
        let scope = |c: &Check| (c.key.0 >> 64) as u64;
        let mut groups = [Group {
            idx: [0; MAX_CHECKS],
            len: 0,
        }; MAX_CHECKS];
        let mut count = 0;
        let mut done = [false; MAX_CHECKS];
        for i in 0..n {
            if done[i] {
                continue;
            }
            let g = &mut groups[count];
            for j in i..n {
                if !done[j] && scope(&checks[j]) == scope(&checks[i]) {
                    done[j] = true;
                    g.idx[g.len] = j;
                    g.len += 1;
                }
            }
            count += 1;
        }
        // The `now` each group that took its cost was decided at.
        let mut taken: [Option<String>; MAX_CHECKS] = std::array::from_fn(|_| None);
        let mut admitted = true;
        for (g, group) in groups[..count].iter().enumerate() {
            let idx = &group.idx[..group.len];
            let r = self
                .group_call(now, owner, checks, idx, !admitted, out)
                .await;
            match r {
                Ok((true, at)) => taken[g] = Some(at),
                Ok((false, _)) => admitted = false,
                // A probe that fails changes nothing: the request is refused
                // already; that group's numbers stay as they were.
                Err(_) if !admitted => {}
                Err(e) => {
                    self.refund(now, owner, checks, &groups[..count], &taken, out)
                        .await;
                    return Err(e);
                }
            }
        }
        if !admitted {
            self.refund(now, owner, checks, &groups[..count], &taken, out)
                .await;
        }
        Ok(admitted)
    }

    /// One `decide.lua` call on one group; with `probe`, an extra check that
    /// always refuses (a concurrency check of limit 0 on the group's first
    /// key, never written) makes it evaluate without writing. Returns whether
    /// the group admitted and the `now` the script used.
    async fn group_call(
        &self,
        now: &str,
        owner: &str,
        checks: &[Check],
        idx: &[usize],
        probe: bool,
        out: &mut [Evaluation],
    ) -> Result<(bool, String), StoreError> {
        const BAD: StoreError = StoreError::Unavailable("redis: unexpected script reply");
        let mut inv = super::DECIDE.prepare_invoke();
        inv.arg(now).arg(owner);
        for &i in idx {
            add_check(&mut inv, self.redis_key(checks[i].key), &checks[i]);
        }
        if probe {
            inv.key(self.redis_key(checks[idx[0]].key));
            inv.arg("l").arg(1).arg("1").arg(0).arg(0);
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        let len = 2 + 4 * idx.len();
        if reply.len() != len + if probe { 4 } else { 0 } {
            return Err(BAD);
        }
        let admitted = parse_reply(&reply[..len], idx, out)?;
        let at = match &reply[1] {
            Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| BAD)?,
            Value::Int(i) => i.to_string(),
            _ => return Err(BAD),
        };
        Ok((admitted && !probe, at))
    }

    /// Gives back, in every group that took its cost, what each admitting
    /// check took. Best effort: a refund that fails leaves the cost taken
    /// (under-admission only).
    async fn refund(
        &self,
        now: &str,
        owner: &str,
        checks: &[Check],
        groups: &[Group],
        taken: &[Option<String>],
        out: &[Evaluation],
    ) {
        for (group, at) in groups.iter().zip(taken) {
            let Some(at) = at else { continue };
            let mut inv = REFUND.prepare_invoke();
            inv.arg(now).arg(at).arg(owner);
            let mut any = false;
            for &i in &group.idx[..group.len] {
                if !out[i].admit {
                    continue; // took nothing
                }
                any = true;
                let c = &checks[i];
                inv.key(self.redis_key(c.key));
                let (kind, p1, p2) = params_of(c);
                inv.arg(kind).arg(c.cost).arg(p1).arg(p2);
            }
            if any {
                let _ = self.invoke::<i64>(&inv).await;
            }
        }
    }
}
