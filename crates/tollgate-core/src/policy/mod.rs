//! The policy file: plans, operations, limits, headers, payload and retry rules.
//!
//! Text goes through three stages: [`raw`] (serde, with spans) →
//! validation (every problem with file, line, column and a fix) →
//! [`CompiledPolicy`] (indexes, no strings looked up per request). Only
//! validated types leave this module. The format is documented in
//! `docs/policy.md`; the presets in `examples/policies/` use every part of it.

mod compiled;
pub mod raw;
mod router;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;

pub use compiled::*;
pub use validate::{parse, parse_size};

use crate::error::{PolicyError, PolicyErrors};

/// Reads and validates a policy file.
///
/// # Errors
/// The file cannot be read, or every problem found in it.
pub fn load(path: &Path) -> Result<CompiledPolicy, PolicyErrors> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|source| {
        PolicyErrors(vec![PolicyError::Read {
            file: file.clone(),
            source,
        }])
    })?;
    parse(&src, &file)
}

/// Per-account limit numbers, replacing the plan's (enterprise custom limits).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountOverrides {
    entries: Vec<(LimitId, LimitOverride)>,
}

impl AccountOverrides {
    /// Validates overrides given as `{limit name: {limit | capacity | refill}}`
    /// against `policy`.
    ///
    /// # Errors
    /// A plain-language message naming the first unknown limit or bad number.
    pub fn parse(
        policy: &CompiledPolicy,
        raw: &BTreeMap<String, OverrideValues>,
    ) -> Result<AccountOverrides, String> {
        let mut entries = Vec::new();
        for (name, v) in raw {
            let id = policy
                .limit(name)
                .ok_or_else(|| format!("unknown limit `{name}`"))?;
            let is_bucket = matches!(
                policy.limits[usize::from(id)].algorithm,
                Algorithm::TokenBucket { .. }
            );
            if is_bucket && v.limit.is_some() {
                return Err(format!(
                    "limit `{name}` is a token bucket: override `capacity` and `refill`, not `limit`"
                ));
            }
            if !is_bucket && (v.capacity.is_some() || v.refill.is_some()) {
                return Err(format!(
                    "limit `{name}` takes `limit`, not `capacity` or `refill`"
                ));
            }
            let nz = |x: Option<u64>, what: &str| match x {
                None => Ok(None),
                Some(n) if (1..=1 << 40).contains(&n) => Ok(std::num::NonZeroU64::new(n)),
                Some(n) => Err(format!(
                    "`{what}` of `{name}` must be between 1 and {}, not {n}",
                    1u64 << 40
                )),
            };
            let ov = LimitOverride {
                limit: nz(v.limit, "limit")?,
                capacity: nz(v.capacity, "capacity")?,
                refill: nz(v.refill, "refill")?,
            };
            if let Algorithm::TokenBucket { rate, .. } =
                policy.limits[usize::from(id)].algorithm.with_override(&ov)
                && !rate.is_representable()
            {
                return Err(format!(
                    "limit `{name}`: the overridden bucket takes more than 100 years to fill; raise `refill` or lower `capacity`"
                ));
            }
            entries.push((id, ov));
        }
        Ok(AccountOverrides { entries })
    }

    /// The override for `limit`, if any.
    pub fn get(&self, limit: LimitId) -> Option<&LimitOverride> {
        self.entries
            .iter()
            .find(|(id, _)| *id == limit)
            .map(|(_, o)| o)
    }

    /// Whether there is no override.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Override numbers as they arrive from the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideValues {
    /// New N.
    pub limit: Option<u64>,
    /// New bucket capacity.
    pub capacity: Option<u64>,
    /// New bucket refill per period.
    pub refill: Option<u64>,
}
