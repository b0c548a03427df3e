//! Raw policy → compiled policy, collecting every problem with its location.
//!
//! TOML syntax and unknown fields stop parsing at the first error (that is
//! serde's model); everything after that (numbers, names, references,
//! overlaps, costs against capacities) is checked in full, so one run of
//! `tollgate check-config` lists every semantic problem.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU64;
use std::ops::Range;
use std::time::Duration;

use jiff::tz::TimeZone;
use toml::Spanned;

use super::compiled::*;
use super::raw::*;
use super::router::{Route, Router, parse_pattern};
use crate::algorithm::calendar_window::{Calendar, CalendarUnit};
use crate::algorithm::gcra::GcraRate;
use crate::algorithm::sliding_window::{MAX_EXACT_LIMIT, MAX_LENGTH, Precision, SlidingWindow};
use crate::clock::Nanos;
use crate::error::{Location, PolicyError, PolicyErrors};

/// Largest count, capacity or cost accepted (2^40): keeps every product in range.
const MAX_NUMBER: i64 = 1 << 40;
const BUILTIN_SCOPES: [&str; 5] = ["org", "account", "app", "key", "ip"];
const DEFAULT_OPERATION: &str = "default";

/// Parses and validates policy text. `file` names it in messages.
///
/// # Errors
/// Every problem found, each with file, line, column and a fix.
pub fn parse(src: &str, file: &str) -> Result<CompiledPolicy, PolicyErrors> {
    let mut ctx = Ctx::new(src, file);
    let raw: RawPolicy = match toml::from_str(src) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = syntax_message(e.message());
            return Err(PolicyErrors(vec![PolicyError::Syntax {
                at: ctx.loc(&span),
                message,
            }]));
        }
    };
    let compiled = ctx.compile(&raw);
    if ctx.errors.is_empty() {
        Ok(compiled.expect("no errors means a policy"))
    } else {
        ctx.errors
            .sort_by_key(|e| location_of(e).map(|l| (l.line, l.column)));
        Err(PolicyErrors(ctx.errors))
    }
}

fn syntax_message(msg: &str) -> String {
    let msg = msg.trim_end();
    if msg.starts_with("unknown field") {
        format!("{msg}; remove it or fix its spelling")
    } else {
        msg.to_owned()
    }
}

fn location_of(e: &PolicyError) -> Option<&Location> {
    match e {
        PolicyError::Syntax { at, .. }
        | PolicyError::NotPositive { at, .. }
        | PolicyError::UnknownReference { at, .. }
        | PolicyError::CostAboveCapacity { at, .. }
        | PolicyError::OverlappingPaths { at, .. }
        | PolicyError::Invalid { at, .. } => Some(at),
        _ => None,
    }
}

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
    errors: Vec<PolicyError>,
}

impl<'a> Ctx<'a> {
    fn new(src: &'a str, file: &'a str) -> Ctx<'a> {
        Ctx {
            file,
            src,
            errors: Vec::new(),
        }
    }

    fn loc(&self, span: &Range<usize>) -> Location {
        let start = span.start.min(self.src.len());
        let before = &self.src[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self.src[line_start..start].chars().count() + 1;
        Location {
            file: self.file.to_owned(),
            line,
            column,
        }
    }

    fn invalid(&mut self, span: &Range<usize>, message: String) {
        let at = self.loc(span);
        self.errors.push(PolicyError::Invalid { at, message });
    }

    fn unknown(&mut self, span: &Range<usize>, kind: &'static str, name: &str, known: Vec<&str>) {
        let at = self.loc(span);
        let known = if known.is_empty() {
            "(none)".to_owned()
        } else {
            known.join(", ")
        };
        self.errors.push(PolicyError::UnknownReference {
            at,
            kind,
            name: name.to_owned(),
            known,
        });
    }

    /// A positive number no larger than [`MAX_NUMBER`].
    fn positive(
        &mut self,
        v: &Spanned<i64>,
        field: &'static str,
        fix: &'static str,
    ) -> Option<NonZeroU64> {
        let n = *v.get_ref();
        if n <= 0 {
            let at = self.loc(&v.span());
            self.errors.push(PolicyError::NotPositive {
                at,
                field,
                value: n,
                fix,
            });
            return None;
        }
        if n > MAX_NUMBER {
            self.invalid(
                &v.span(),
                format!("`{field}` = {n} is larger than the maximum {MAX_NUMBER}"),
            );
            return None;
        }
        NonZeroU64::new(n as u64)
    }

    /// A number ≥ 0 no larger than [`MAX_NUMBER`].
    fn non_negative(&mut self, v: &Spanned<i64>, field: &str) -> Option<u64> {
        let n = *v.get_ref();
        if !(0..=MAX_NUMBER).contains(&n) {
            self.invalid(
                &v.span(),
                format!("`{field}` must be between 0 and {MAX_NUMBER}, not {n}"),
            );
            return None;
        }
        Some(n as u64)
    }

    fn duration(&mut self, v: &Spanned<String>, field: &str) -> Option<Duration> {
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.invalid(&v.span(), format!("`{field}` must be longer than zero"));
                None
            }
            Err(_) => {
                self.invalid(
                    &v.span(),
                    format!("`{field}` = \"{}\" is not a duration; write e.g. \"500ms\", \"3s\", \"1m\", \"1h\"", v.get_ref()),
                );
                None
            }
        }
    }

    fn one_of<'v>(
        &mut self,
        v: &'v Spanned<String>,
        field: &str,
        allowed: &[&str],
    ) -> Option<&'v str> {
        let s = v.get_ref().as_str();
        if allowed.contains(&s) {
            Some(s)
        } else {
            self.invalid(
                &v.span(),
                format!("`{field}` = \"{s}\" is not one of: {}", quoted(allowed)),
            );
            None
        }
    }

    fn time_zone(&mut self, v: &Spanned<String>) -> Option<TimeZone> {
        match TimeZone::get(v.get_ref()) {
            Ok(tz) => Some(tz),
            Err(_) => {
                self.invalid(
                    &v.span(),
                    format!("unknown time zone \"{}\"; use an IANA name such as \"UTC\" or \"Europe/Paris\"", v.get_ref()),
                );
                None
            }
        }
    }

    fn header_name(&mut self, v: &Spanned<String>, field: &str) -> Option<String> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if ok {
            Some(s.clone())
        } else {
            self.invalid(
                &v.span(),
                format!("`{field}` = \"{s}\" is not a valid HTTP header name"),
            );
            None
        }
    }

    fn status(&mut self, v: &Spanned<i64>, field: &str) -> Option<u16> {
        let n = *v.get_ref();
        if (400..=599).contains(&n) {
            Some(n as u16)
        } else {
            self.invalid(
                &v.span(),
                format!("`{field}` must be an error status between 400 and 599, not {n}"),
            );
            None
        }
    }

    fn compile(&mut self, raw: &RawPolicy) -> Option<CompiledPolicy> {
        let meta_default = RawMeta::default();
        let meta = raw.policy.as_ref().map_or(&meta_default, |m| m.get_ref());
        let name = meta
            .name
            .as_ref()
            .map_or_else(|| "policy".to_owned(), |n| n.get_ref().clone());
        let key_header = match &meta.key_header {
            Some(h) => self
                .header_name(h, "key_header")
                .map(|h| h.to_ascii_lowercase()),
            None => Some("x-api-key".to_owned()),
        };
        let unmatched = match &meta.unmatched {
            Some(u) => match self.one_of(u, "unmatched", &["forward", "reject"]) {
                Some("reject") => Unmatched::Reject,
                _ => Unmatched::Forward,
            },
            None => Unmatched::Forward,
        };
        let default_tz = match &meta.time_zone {
            Some(tz) => self.time_zone(tz).unwrap_or(TimeZone::UTC),
            None => TimeZone::UTC,
        };

        let attributes = self.attributes(raw);
        let (operations, routes, op_spans) = self.operations(raw, &attributes);
        let limits = self.limits(raw, &operations, &attributes, &default_tz);
        self.check_overlaps(&routes, &operations, &op_spans);
        let plans = self.plans(raw, &limits, &operations);
        self.check_costs(raw, &limits, &operations, &plans);
        let default_plan = self.default_plan(meta, &plans, raw);
        let headers = self.headers(raw);
        let credits = self.credits(raw);
        let upstream = self.upstream(raw);

        if !self.errors.is_empty() {
            return None;
        }
        let limits: Vec<Limit> = limits
            .into_iter()
            .map(|(l, _)| l.expect("no errors"))
            .collect();
        let plans: Vec<Plan> = plans.into_iter().map(|p| p.plan).collect();
        // The one-scope program of each plan and operation (the engine
        // looks it up before the limit list).
        let one_scope = plans
            .iter()
            .flat_map(|plan| &plan.by_operation)
            .map(|pls| super::compiled::OneScope::new(&limits, pls))
            .collect();
        Some(CompiledPolicy {
            name,
            key_header: key_header?,
            unmatched,
            limits,
            operations,
            plans,
            default_plan: default_plan?,
            attributes: attributes.into_iter().map(|(a, _)| a).collect(),
            headers: headers?,
            credits: credits?,
            upstream: upstream?,
            router: Router::new(routes),
            one_scope,
        })
    }

    fn attributes(&mut self, raw: &RawPolicy) -> Vec<(Attribute, Option<AttributeSource>)> {
        let mut out = Vec::new();
        for (name, source) in &raw.attributes {
            if BUILTIN_SCOPES.contains(&name.as_str()) {
                self.invalid(
                    &source.span(),
                    format!(
                        "attribute `{name}` has the name of a built-in scope; choose another name"
                    ),
                );
                continue;
            }
            let src = self.attribute_source(source);
            out.push((Attribute { name: name.clone() }, src));
        }
        out
    }

    fn attribute_source(&mut self, v: &Spanned<String>) -> Option<AttributeSource> {
        let s = v.get_ref();
        let parsed = match s.split_once(':') {
            Some(("header", h)) if !h.is_empty() => {
                Some(AttributeSource::Header(h.to_ascii_lowercase()))
            }
            Some(("query", q)) if !q.is_empty() => Some(AttributeSource::Query(q.to_owned())),
            Some(("json", f)) if !f.is_empty() => Some(AttributeSource::Json(f.to_owned())),
            Some(("multipart", "filename")) => Some(AttributeSource::MultipartFilename),
            _ => None,
        };
        if parsed.is_none() {
            self.invalid(
                &v.span(),
                format!("attribute source \"{s}\" is not one of \"header:NAME\", \"query:NAME\", \"json:FIELD\", \"multipart:filename\""),
            );
        }
        parsed
    }

    #[allow(clippy::type_complexity)]
    fn operations(
        &mut self,
        raw: &RawPolicy,
        attributes: &[(Attribute, Option<AttributeSource>)],
    ) -> (Vec<Operation>, Vec<Route>, Vec<Range<usize>>) {
        let mut ops = Vec::new();
        let mut routes = Vec::new();
        let mut spans = Vec::new();
        let mut declared_default = None;
        for (name, op) in &raw.operations {
            let id = ops.len() as OperationId;
            let o = op.get_ref();
            if name == DEFAULT_OPERATION {
                if o.method.is_some() || o.path.is_some() || o.paths.is_some() {
                    self.invalid(
                        &op.span(),
                        "operation `default` is used for requests that match no other operation; it takes no `method` or `path`".to_owned(),
                    );
                }
                declared_default = Some(ops.len());
            } else {
                let method = match &o.method {
                    Some(m) if m.get_ref() == "*" => None,
                    Some(m) => {
                        let up = m.get_ref().to_ascii_uppercase();
                        if up.is_empty() || !up.bytes().all(|b| b.is_ascii_alphabetic()) {
                            self.invalid(&m.span(), format!("method \"{}\" is not an HTTP method; write e.g. \"GET\" or \"*\"", m.get_ref()));
                        }
                        Some(up)
                    }
                    None => None,
                };
                let patterns: Vec<&Spanned<String>> = match (&o.path, &o.paths) {
                    (Some(_), Some(_)) => {
                        self.invalid(
                            &op.span(),
                            format!("operation `{name}` has both `path` and `paths`; keep one"),
                        );
                        Vec::new()
                    }
                    (Some(p), None) => vec![p],
                    (None, Some(ps)) => ps.iter().collect(),
                    (None, None) => {
                        self.invalid(
                            &op.span(),
                            format!(
                                "operation `{name}` needs a `path` (e.g. path = \"/v1/segment\")"
                            ),
                        );
                        Vec::new()
                    }
                };
                for p in patterns {
                    match parse_pattern(p.get_ref()) {
                        Ok(segments) => {
                            routes.push(Route {
                                method: method.clone(),
                                segments,
                                operation: id,
                                pattern: p.get_ref().clone(),
                            });
                            spans.push(p.span());
                        }
                        Err(msg) => self.invalid(&p.span(), msg),
                    }
                }
            }
            let credits = o
                .credits
                .as_ref()
                .and_then(|c| self.non_negative(c, "credits"))
                .unwrap_or(0);
            if let Some(c) = &o.cost {
                self.non_negative(c, "cost");
            }
            for c in o.costs.values() {
                self.non_negative(c, "costs");
            }
            let respond = o.respond.as_ref().and_then(|r| {
                match self.one_of(r, "respond", &["balance", "account"]) {
                    Some("balance") => Some(Respond::Balance),
                    Some(_) => Some(Respond::Account),
                    None => None,
                }
            });
            let mut sources: Vec<Option<AttributeSource>> =
                attributes.iter().map(|(_, s)| s.clone()).collect();
            for (attr, src) in &o.attributes {
                match attributes.iter().position(|(a, _)| &a.name == attr) {
                    Some(i) => sources[i] = self.attribute_source(src),
                    None => {
                        let known = attributes.iter().map(|(a, _)| a.name.as_str()).collect();
                        self.unknown(&src.span(), "attribute", attr, known);
                    }
                }
            }
            let payload = o.payload.as_ref().map(|p| self.payload(p));
            let credits_from_header = o.credits_from_header.as_ref().and_then(|h| {
                if credits == 0 {
                    self.invalid(
                        &h.span(),
                        format!("operation `{name}` reads the credits used from `{}` but reserves none; set `credits` to the most one request may cost (the reservation)", h.get_ref()),
                    );
                } else if respond.is_some() {
                    self.invalid(
                        &h.span(),
                        format!("operation `{name}` is answered by tollgate (`respond`), so there is no upstream answer to read `credits_from_header` from; remove one of them"),
                    );
                }
                self.header_name(h, "credits_from_header")
                    .map(|n| n.to_ascii_lowercase())
            });
            ops.push(Operation {
                name: name.clone(),
                credits,
                credits_from_header,
                retry: o.retry.unwrap_or(true),
                respond,
                attribute_sources: sources,
                payload,
            });
        }
        // The default operation goes last: move a declared one there, or add one.
        match declared_default {
            Some(i) => {
                let d = ops.remove(i);
                for r in &mut routes {
                    if usize::from(r.operation) > i {
                        r.operation -= 1;
                    }
                }
                ops.push(d);
            }
            None => ops.push(Operation {
                name: DEFAULT_OPERATION.to_owned(),
                credits: 0,
                credits_from_header: None,
                retry: true,
                respond: None,
                attribute_sources: attributes.iter().map(|(_, s)| s.clone()).collect(),
                payload: None,
            }),
        }
        (ops, routes, spans)
    }

    fn payload(&mut self, p: &Spanned<RawPayload>) -> PayloadRules {
        let r = p.get_ref();
        let max_body = r.max_body.as_ref().and_then(|v| self.size(v, "max_body"));
        let mut formats = Vec::new();
        for f in r.formats.iter().flatten() {
            match self.one_of(
                f,
                "formats",
                &["png", "jpeg", "jpg", "webp", "heic", "heif"],
            ) {
                Some("png") => formats.push(ImageFormat::Png),
                Some("jpeg" | "jpg") => formats.push(ImageFormat::Jpeg),
                Some("webp") => formats.push(ImageFormat::Webp),
                Some(_) => formats.push(ImageFormat::Heic),
                None => {}
            }
        }
        let max_pixels = r
            .max_pixels
            .as_ref()
            .and_then(|m| {
                self.positive(
                    m,
                    "max_pixels",
                    "write the largest side in pixels, e.g. 6000",
                )
            })
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let forward_oversize = r
            .oversize
            .as_ref()
            .and_then(|o| self.one_of(o, "oversize", &["reject", "forward"]))
            == Some("forward");
        PayloadRules {
            max_body,
            formats,
            max_pixels,
            forward_oversize,
            single_file: r.single_file.unwrap_or(true),
        }
    }

    /// A byte size: an integer, or a string with a unit (B, KB, MB, GB, KiB, MiB, GiB).
    fn size(&mut self, v: &Spanned<toml::Value>, field: &str) -> Option<u64> {
        let parsed = match v.get_ref() {
            toml::Value::Integer(n) if *n > 0 => Some(*n as u64),
            toml::Value::String(s) => parse_size(s),
            _ => None,
        };
        if parsed.is_none() {
            self.invalid(
                &v.span(),
                format!("`{field}` must be a positive size such as 1048576, \"50MB\" or \"30MiB\""),
            );
        }
        parsed
    }

    /// `on_store_error` and `local_share` of limit `name`.
    fn fail_mode(&mut self, name: &str, r: &RawLimit, algorithm: Option<&Algorithm>) -> FailMode {
        let mode = r
            .on_store_error
            .as_ref()
            .and_then(|m| self.one_of(m, "on_store_error", &["allow", "deny", "local"]));
        let local = mode == Some("local");
        match (&r.local_share, local) {
            (Some(v), false) => {
                self.invalid(
                    &v.span(),
                    format!("limit `{name}`: `local_share` applies only with on_store_error = \"local\"; remove it or set on_store_error = \"local\""),
                );
                FailMode::Deny
            }
            (None, true) => {
                let span = r
                    .on_store_error
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or_default();
                self.invalid(
                    &span,
                    format!("limit `{name}`: on_store_error = \"local\" needs `local_share`, the fraction of the limit one replica admits on its own while the store is down, such as 0.25 with 4 replicas"),
                );
                FailMode::Deny
            }
            (Some(v), true) => {
                let Some(share) = LocalShare::from_fraction(*v.get_ref()) else {
                    self.invalid(
                        &v.span(),
                        format!("limit `{name}`: `local_share` = {} must be a fraction above 0 and at most 1, such as 0.25", v.get_ref()),
                    );
                    return FailMode::Deny;
                };
                // Every number the local counter runs on must stay at least 1.
                let numbers: &[(&str, u64)] = match algorithm {
                    Some(Algorithm::TokenBucket { rate, refill, .. }) => {
                        &[("capacity", rate.capacity), ("refill", refill.get())]
                    }
                    Some(Algorithm::SlidingWindow { window, .. }) => &[("limit", window.limit)],
                    Some(Algorithm::CalendarWindow { limit, .. })
                    | Some(Algorithm::Concurrency { limit, .. }) => &[("limit", *limit)],
                    None => &[],
                };
                if let Some((field, n)) = numbers.iter().find(|(_, n)| share.of(*n) == 0) {
                    self.invalid(
                        &v.span(),
                        format!("limit `{name}`: `local_share` = {} of {field} {n} leaves less than 1 for one replica; raise local_share or {field}", v.get_ref()),
                    );
                    return FailMode::Deny;
                }
                FailMode::Local { share }
            }
            (None, false) => match mode {
                Some("allow") => FailMode::Allow,
                _ => FailMode::Deny,
            },
        }
    }

    #[allow(clippy::type_complexity)]
    fn limits(
        &mut self,
        raw: &RawPolicy,
        ops: &[Operation],
        attributes: &[(Attribute, Option<AttributeSource>)],
        default_tz: &TimeZone,
    ) -> Vec<(Option<Limit>, Option<HashSet<OperationId>>)> {
        let mut out = Vec::new();
        for (name, l) in &raw.limits {
            let r = l.get_ref();
            let algorithm = self.algorithm(name, l, default_tz);
            let scope = self.scope(l, attributes);
            let counted = r.operations.as_ref().map(|names| {
                let mut set = HashSet::new();
                for n in names {
                    match ops.iter().position(|o| &o.name == n.get_ref()) {
                        Some(i) => {
                            set.insert(i as OperationId);
                        }
                        None => {
                            let known = ops.iter().map(|o| o.name.as_str()).collect();
                            self.unknown(&n.span(), "operation", n.get_ref(), known);
                        }
                    }
                }
                set
            });
            let mode = match r
                .mode
                .as_ref()
                .and_then(|m| self.one_of(m, "mode", &["enforce", "soft", "shadow"]))
            {
                Some("soft") => Mode::Soft,
                Some("shadow") => Mode::Shadow,
                _ => Mode::Enforce,
            };
            let on_store_error = self.fail_mode(name, r, algorithm.as_ref());
            let rollout_after = r
                .rollout_after
                .as_ref()
                .and_then(|v| self.timestamp(v, "rollout_after"));
            let on_exceed = match &r.on_exceed {
                Some(a) => self.action(a),
                None => Some(Action::Reject {
                    status: 429,
                    body: None,
                }),
            };
            let limit = match (algorithm, scope, on_exceed) {
                (Some(algorithm), Some(scope), Some(on_exceed)) => Some(Limit {
                    name: name.clone(),
                    name_hash: xxhash_rust::xxh3::xxh3_64(name.as_bytes()),
                    algorithm,
                    scope,
                    mode,
                    rollout_after,
                    on_exceed,
                    on_store_error,
                }),
                _ => None,
            };
            out.push((limit, counted));
        }
        out
    }

    fn timestamp(&mut self, v: &Spanned<String>, field: &str) -> Option<Nanos> {
        match v.get_ref().parse::<jiff::Timestamp>() {
            Ok(t) => match u64::try_from(t.as_nanosecond()) {
                Ok(n) => Some(Nanos(n)),
                Err(_) => {
                    self.invalid(&v.span(), format!("`{field}` must be after 1970"));
                    None
                }
            },
            Err(_) => {
                self.invalid(
                    &v.span(),
                    format!("`{field}` = \"{}\" is not an RFC 3339 instant; write e.g. \"2026-01-01T00:00:00Z\"", v.get_ref()),
                );
                None
            }
        }
    }

    fn algorithm(
        &mut self,
        name: &str,
        l: &Spanned<RawLimit>,
        default_tz: &TimeZone,
    ) -> Option<Algorithm> {
        let r = l.get_ref();
        let kind = self.one_of(
            &r.algorithm,
            "algorithm",
            &[
                "token_bucket",
                "sliding_window",
                "calendar_window",
                "concurrency",
            ],
        )?;
        // Fields that belong to another algorithm are mistakes, not defaults.
        let present: [(&str, Option<Range<usize>>); 7] = [
            ("limit", r.limit.as_ref().map(Spanned::span)),
            ("window", r.window.as_ref().map(Spanned::span)),
            ("precision", r.precision.as_ref().map(Spanned::span)),
            ("capacity", r.capacity.as_ref().map(Spanned::span)),
            ("refill", r.refill.as_ref().map(Spanned::span)),
            ("refill_every", r.refill_every.as_ref().map(Spanned::span)),
            ("lease_ttl", r.lease_ttl.as_ref().map(Spanned::span)),
        ];
        let allowed: &[&str] = match kind {
            "token_bucket" => &["capacity", "refill", "refill_every"],
            "sliding_window" => &["limit", "window", "precision"],
            "calendar_window" => &["limit", "window"],
            _ => &["limit", "lease_ttl"],
        };
        for (field, span) in &present {
            if let Some(span) = span
                && !allowed.contains(field)
            {
                self.invalid(
                    span,
                    format!(
                        "`{field}` does not apply to a {kind} limit; it takes {}",
                        quoted(allowed)
                    ),
                );
            }
        }
        if kind != "calendar_window"
            && let Some(tz) = &r.time_zone
        {
            self.invalid(
                &tz.span(),
                "`time_zone` applies to calendar_window limits only".to_owned(),
            );
        }
        let need = |ctx: &mut Self, field: &str| {
            ctx.invalid(
                &l.span(),
                format!("limit `{name}` ({kind}) needs `{field}`"),
            );
        };
        match kind {
            "token_bucket" => {
                let capacity = match &r.capacity {
                    Some(c) => self.positive(c, "capacity", "a bucket holds at least one token"),
                    None => {
                        need(self, "capacity");
                        None
                    }
                };
                let refill = match &r.refill {
                    Some(c) => self.positive(
                        c,
                        "refill",
                        "a bucket must refill at least one token per period",
                    ),
                    None => {
                        need(self, "refill");
                        None
                    }
                };
                let per = match &r.refill_every {
                    Some(d) => self.duration(d, "refill_every"),
                    None => Some(Duration::from_secs(1)),
                };
                let (capacity, refill, per) = (capacity?, refill?, per?);
                let rate = GcraRate::new(capacity, refill, per);
                if !rate.is_representable() {
                    self.invalid(
                        &l.span(),
                        format!(
                            "limit `{name}`: a bucket of {capacity} tokens refilling {refill} per {per:?} takes more than 100 years to fill; raise `refill` or lower `capacity`"
                        ),
                    );
                    return None;
                }
                Some(Algorithm::TokenBucket { rate, refill, per })
            }
            "sliding_window" => {
                let limit = self.window_limit(name, l, kind)?;
                let length = match &r.window {
                    Some(w) => self.duration(w, "window")?,
                    None => {
                        need(self, "window");
                        return None;
                    }
                };
                let precision = match &r.precision {
                    Some(p) => match self.one_of(p, "precision", &["exact", "approximate"])? {
                        "exact" => Precision::Exact,
                        _ => Precision::Approximate,
                    },
                    None => Precision::Exact,
                };
                if length > MAX_LENGTH {
                    self.invalid(
                        &r.window.as_ref().map_or(l.span(), Spanned::span),
                        format!(
                            "sliding window `{name}` is longer than 100 days; use a calendar_window for longer periods"
                        ),
                    );
                    return None;
                }
                let limit = u32::try_from(limit.get()).ok().or_else(|| {
                    self.invalid(
                        &l.span(),
                        format!(
                            "sliding window `{name}` allows at most {} per window",
                            u32::MAX
                        ),
                    );
                    None
                })?;
                if precision == Precision::Exact && limit > MAX_EXACT_LIMIT {
                    let span = match (&r.precision, &r.limit) {
                        (Some(p), _) => p.span(),
                        (None, Some(v)) => v.span(),
                        (None, None) => l.span(),
                    };
                    self.invalid(
                        &span,
                        format!(
                            "sliding window `{name}`: an exact window keeps one entry per admission (16 B each), so `limit` may be at most {MAX_EXACT_LIMIT}, not {limit}; set precision = \"approximate\" (16 entries per counter whatever the limit; capacity comes back between T and T + T/15 after use) or use a token_bucket or calendar_window"
                        ),
                    );
                    return None;
                }
                Some(Algorithm::SlidingWindow {
                    window: SlidingWindow::with_precision(limit, length, precision),
                    length,
                })
            }
            "calendar_window" => {
                let limit = self.window_limit(name, l, kind);
                let unit = match &r.window {
                    Some(w) => match self.one_of(w, "window", &["minute", "hour", "day"]) {
                        Some("minute") => Some(CalendarUnit::Minute),
                        Some("hour") => Some(CalendarUnit::Hour),
                        Some(_) => Some(CalendarUnit::Day),
                        None => None,
                    },
                    None => {
                        need(self, "window");
                        None
                    }
                };
                let tz = match &r.time_zone {
                    Some(tz) => self.time_zone(tz),
                    None => Some(default_tz.clone()),
                };
                let (limit, unit, tz) = (limit?, unit?, tz?);
                Some(Algorithm::CalendarWindow {
                    limit: limit.get(),
                    calendar: Calendar::new(unit, tz),
                })
            }
            _ => {
                let limit = self.window_limit(name, l, kind)?;
                let ttl = match &r.lease_ttl {
                    Some(d) => self.duration(d, "lease_ttl")?,
                    None => Duration::from_secs(300),
                };
                Some(Algorithm::Concurrency {
                    limit: limit.get(),
                    ttl,
                })
            }
        }
    }

    fn window_limit(
        &mut self,
        name: &str,
        l: &Spanned<RawLimit>,
        kind: &str,
    ) -> Option<NonZeroU64> {
        match &l.get_ref().limit {
            Some(v) => self.positive(
                v,
                "limit",
                "a limit of zero refuses everything; remove the limit or raise it",
            ),
            None => {
                self.invalid(&l.span(), format!("limit `{name}` ({kind}) needs `limit`"));
                None
            }
        }
    }

    fn scope(
        &mut self,
        l: &Spanned<RawLimit>,
        attributes: &[(Attribute, Option<AttributeSource>)],
    ) -> Option<Vec<ScopePart>> {
        let Some(parts) = &l.get_ref().scope else {
            return Some(vec![ScopePart::Account]);
        };
        if parts.get_ref().is_empty() {
            self.invalid(
                &parts.span(),
                "`scope` is empty; name what the counter is keyed by, e.g. [\"account\"]"
                    .to_owned(),
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for p in parts.get_ref() {
            let part = match p.get_ref().as_str() {
                "org" => Some(ScopePart::Org),
                "account" => Some(ScopePart::Account),
                "app" => Some(ScopePart::App),
                "key" => Some(ScopePart::Key),
                "ip" => Some(ScopePart::Ip),
                other => match attributes.iter().position(|(a, _)| a.name == other) {
                    Some(i) => Some(ScopePart::Attribute(i as AttributeId)),
                    None => {
                        let mut known: Vec<&str> = BUILTIN_SCOPES.to_vec();
                        known.extend(attributes.iter().map(|(a, _)| a.name.as_str()));
                        let at = self.loc(&p.span());
                        self.errors.push(PolicyError::UnknownReference {
                            at,
                            kind: "scope",
                            name: other.to_owned(),
                            known: format!(
                                "{} (declare others under [attributes])",
                                known.join(", ")
                            ),
                        });
                        None
                    }
                },
            };
            match part {
                Some(part) if out.contains(&part) => {
                    self.invalid(
                        &p.span(),
                        format!("scope part `{}` appears twice", p.get_ref()),
                    );
                    ok = false;
                }
                Some(part) => out.push(part),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn action(&mut self, a: &Spanned<RawAction>) -> Option<Action> {
        let r = a.get_ref();
        let kind = match &r.action {
            Some(k) => self.one_of(k, "action", &["reject", "forward"])?,
            None => "reject",
        };
        if kind == "forward" {
            if r.status.is_some() || r.body.is_some() {
                self.invalid(&a.span(), "a `forward` action sends no status or body of its own; remove `status` and `body`".to_owned());
            }
            let header = match &r.header {
                Some(h) => self.header_name(h, "header")?,
                None => "Tollgate-Limit-Exceeded".to_owned(),
            };
            return Some(Action::Forward { header });
        }
        if let Some(h) = &r.header {
            self.invalid(
                &h.span(),
                "`header` applies to `forward` actions only".to_owned(),
            );
        }
        let status = match &r.status {
            Some(s) => self.status(s, "status")?,
            None => 429,
        };
        let body = r.body.clone().map(|b| {
            (
                b,
                r.content_type
                    .clone()
                    .unwrap_or_else(|| "application/json".to_owned()),
            )
        });
        Some(Action::Reject { status, body })
    }

    fn check_overlaps(&mut self, routes: &[Route], ops: &[Operation], spans: &[Range<usize>]) {
        for (j, b) in routes.iter().enumerate() {
            if let Some((i, a)) = routes[..j].iter().enumerate().find(|(_, a)| a.overlaps(b)) {
                let at = self.loc(&spans[j]);
                let other_at = self.loc(&spans[i]);
                self.errors.push(PolicyError::OverlappingPaths {
                    at,
                    pattern: b.pattern.clone(),
                    operation: ops[usize::from(b.operation)].name.clone(),
                    other_pattern: a.pattern.clone(),
                    other: ops[usize::from(a.operation)].name.clone(),
                    other_at,
                });
            }
        }
    }

    fn plans(
        &mut self,
        raw: &RawPolicy,
        limits: &[(Option<Limit>, Option<HashSet<OperationId>>)],
        ops: &[Operation],
    ) -> Vec<PlanBuild> {
        let limit_names: Vec<&str> = raw.limits.keys().map(String::as_str).collect();
        let plans: Vec<(&str, Option<&Spanned<RawPlan>>)> = if raw.plans.is_empty() {
            vec![("default", None)]
        } else {
            raw.plans
                .iter()
                .map(|(n, p)| (n.as_str(), Some(p)))
                .collect()
        };
        let mut out = Vec::new();
        for (name, p) in plans {
            let r = p.map(Spanned::get_ref);
            let chosen: Vec<usize> = match r.and_then(|r| r.limits.as_ref()) {
                Some(names) => names
                    .iter()
                    .filter_map(
                        |n| match limit_names.iter().position(|l| l == n.get_ref()) {
                            Some(i) => Some(i),
                            None => {
                                self.unknown(&n.span(), "limit", n.get_ref(), limit_names.clone());
                                None
                            }
                        },
                    )
                    .collect(),
                None => (0..limit_names.len()).collect(),
            };
            let mut overrides: BTreeMap<usize, LimitOverride> = BTreeMap::new();
            for (lname, o) in r.map(|r| &r.overrides).into_iter().flatten() {
                let Some(i) = limit_names.iter().position(|l| l == lname) else {
                    self.unknown(&o.span(), "limit", lname, limit_names.clone());
                    continue;
                };
                if !chosen.contains(&i) {
                    self.invalid(&o.span(), format!("plan `{name}` overrides limit `{lname}` but does not list it in `limits`"));
                    continue;
                }
                if let Some(alg) = &limits[i].0
                    && let Some(ov) = self.override_of(o.get_ref(), &alg.algorithm, &o.span())
                {
                    overrides.insert(i, ov);
                }
            }
            let grant = r
                .and_then(|r| r.grant.as_ref())
                .and_then(|g| self.non_negative(g, "grant"))
                .unwrap_or(0);
            let allowance = r
                .and_then(|r| r.allowance.as_ref())
                .and_then(|a| self.non_negative(a, "allowance"));
            let every = match r.and_then(|r| r.allowance_every.as_ref()) {
                Some(e) => match self.one_of(e, "allowance_every", &["day", "month"]) {
                    Some("day") => AllowancePeriod::Day,
                    _ => AllowancePeriod::Month,
                },
                None => AllowancePeriod::Month,
            };
            let credits_low = r
                .and_then(|r| r.credits_low.as_ref())
                .and_then(|c| self.non_negative(c, "credits_low"));
            let mut by_operation = vec![Vec::new(); ops.len()];
            for (op_id, list) in by_operation.iter_mut().enumerate() {
                for &i in &chosen {
                    let (Some(limit), counted) = &limits[i] else {
                        continue;
                    };
                    if counted
                        .as_ref()
                        .is_some_and(|set| !set.contains(&(op_id as OperationId)))
                    {
                        continue;
                    }
                    let algorithm = match overrides.get(&i) {
                        Some(o) => limit.algorithm.with_override(o),
                        None => limit.algorithm.clone(),
                    };
                    let cost = op_cost(raw, &ops[op_id].name, &limit.name);
                    list.push(PlanLimit::new(i as LimitId, limit, algorithm, cost));
                }
                if list.len() > MAX_LIMITS_PER_REQUEST {
                    let span = p.map_or(0..0, Spanned::span);
                    self.invalid(
                        &span,
                        format!(
                            "plan `{name}` applies {} limits to operation `{}`; at most {MAX_LIMITS_PER_REQUEST} may apply to one request",
                            list.len(),
                            ops[op_id].name
                        ),
                    );
                }
            }
            out.push(PlanBuild {
                span: p.map(Spanned::span),
                plan: Plan {
                    name: name.to_owned(),
                    grant,
                    allowance: allowance.map(|a| (a, every)),
                    credits_low,
                    by_operation,
                },
            });
        }
        out
    }

    fn override_of(
        &mut self,
        o: &RawOverride,
        alg: &Algorithm,
        span: &Range<usize>,
    ) -> Option<LimitOverride> {
        let is_bucket = matches!(alg, Algorithm::TokenBucket { .. });
        if is_bucket && o.limit.is_some() {
            self.invalid(
                span,
                "a token_bucket override takes `capacity` and `refill`, not `limit`".to_owned(),
            );
            return None;
        }
        if !is_bucket && (o.capacity.is_some() || o.refill.is_some()) {
            self.invalid(
                span,
                "this limit's override takes `limit`, not `capacity` or `refill`".to_owned(),
            );
            return None;
        }
        if let Algorithm::SlidingWindow { window, .. } = alg
            && window.precision() == Precision::Exact
            && let Some(v) = &o.limit
            && *v.get_ref() > i64::from(MAX_EXACT_LIMIT)
        {
            self.invalid(
                &v.span(),
                format!(
                    "an override of an exact sliding window may be at most {MAX_EXACT_LIMIT}, not {}; set precision = \"approximate\" on the limit",
                    v.get_ref()
                ),
            );
            return None;
        }
        let fix = "an override of zero refuses everything";
        Some(LimitOverride {
            limit: match &o.limit {
                Some(v) => Some(self.positive(v, "limit", fix)?),
                None => None,
            },
            capacity: match &o.capacity {
                Some(v) => Some(self.positive(v, "capacity", fix)?),
                None => None,
            },
            refill: match &o.refill {
                Some(v) => Some(self.positive(v, "refill", fix)?),
                None => None,
            },
        })
    }

    fn check_costs(
        &mut self,
        raw: &RawPolicy,
        limits: &[(Option<Limit>, Option<HashSet<OperationId>>)],
        ops: &[Operation],
        plans: &[PlanBuild],
    ) {
        let mut reported = HashSet::new();
        for plan in plans {
            for (op_id, list) in plan.plan.by_operation.iter().enumerate() {
                for pl in list {
                    let capacity = pl.algorithm.capacity();
                    if pl.cost <= capacity || !reported.insert((op_id, pl.limit)) {
                        continue;
                    }
                    let op = &ops[op_id].name;
                    let limit = limits[usize::from(pl.limit)]
                        .0
                        .as_ref()
                        .map_or("", |l| l.name.as_str());
                    let span = cost_span(raw, op, limit)
                        .or(plan.span.clone())
                        .unwrap_or(0..0);
                    let at = self.loc(&span);
                    self.errors.push(PolicyError::CostAboveCapacity {
                        at,
                        cost: pl.cost,
                        capacity,
                        limit: limit.to_owned(),
                        operation: op.clone(),
                    });
                }
            }
        }
    }

    fn default_plan(
        &mut self,
        meta: &RawMeta,
        plans: &[PlanBuild],
        raw: &RawPolicy,
    ) -> Option<PlanId> {
        let names: Vec<&str> = plans.iter().map(|p| p.plan.name.as_str()).collect();
        match &meta.default_plan {
            Some(d) => match names.iter().position(|n| n == d.get_ref()) {
                Some(i) => Some(i as PlanId),
                None => {
                    self.unknown(&d.span(), "plan", d.get_ref(), names);
                    None
                }
            },
            None => {
                if let Some(i) = names.iter().position(|n| *n == "default") {
                    Some(i as PlanId)
                } else if names.len() == 1 {
                    Some(0)
                } else {
                    let span = raw.policy.as_ref().map_or(0..0, Spanned::span);
                    self.invalid(&span, format!("several plans and none named `default`: set `default_plan` in [policy] to one of {}", names.join(", ")));
                    None
                }
            }
        }
    }

    fn headers(&mut self, raw: &RawPolicy) -> Option<HeaderProfile> {
        let default = RawHeaders::default();
        let h = raw.headers.as_ref().map_or(&default, |h| h.get_ref());
        let kind = match h
            .profile
            .as_ref()
            .and_then(|p| self.one_of(p, "profile", &["ietf", "classic", "vendor", "none"]))
        {
            Some("classic") => HeaderKind::Classic,
            Some("vendor") => HeaderKind::Vendor,
            Some("none") => HeaderKind::None,
            _ => HeaderKind::Ietf,
        };
        let send_on = match h
            .send_on
            .as_ref()
            .and_then(|s| self.one_of(s, "send_on", &["all", "success"]))
        {
            Some("success") => SendOn::Success,
            _ => SendOn::All,
        };
        let mut names = Vec::new();
        for (field, name) in &h.names {
            let f = self.field(&Spanned::new(name.span(), field.clone()));
            let n = self.header_name(name, "names");
            if let (Some(f), Some(n)) = (f, n) {
                names.push((f, n));
            }
        }
        if kind == HeaderKind::Vendor && names.is_empty() {
            let span = raw.headers.as_ref().map_or(0..0, Spanned::span);
            self.invalid(&span, "the vendor profile needs [headers.names], e.g. limit = \"X-Vendor-RateLimit-Limit\"".to_owned());
        }
        if kind != HeaderKind::Vendor && !names.is_empty() {
            let span = raw.headers.as_ref().map_or(0..0, Spanned::span);
            self.invalid(
                &span,
                "[headers.names] applies to profile = \"vendor\" only".to_owned(),
            );
        }
        let fields = match &h.fields {
            Some(list) => list.iter().filter_map(|f| self.field(f)).collect(),
            None => match kind {
                HeaderKind::Ietf => vec![
                    HeaderField::Limit,
                    HeaderField::Remaining,
                    HeaderField::Reset,
                ],
                HeaderKind::Classic => vec![
                    HeaderField::Limit,
                    HeaderField::Remaining,
                    HeaderField::Reset,
                    HeaderField::Cost,
                ],
                HeaderKind::Vendor => names.iter().map(|(f, _)| *f).collect(),
                HeaderKind::None => Vec::new(),
            },
        };
        let on_reject = h.on_reject.iter().filter_map(|f| self.field(f)).collect();
        Some(HeaderProfile {
            kind,
            send_on,
            fields,
            on_reject,
            problem_json: h.problem_json.unwrap_or(false),
            names,
        })
    }

    fn field(&mut self, f: &Spanned<String>) -> Option<HeaderField> {
        match self.one_of(
            f,
            "header field",
            &["limit", "remaining", "reset", "cost", "credits"],
        )? {
            "limit" => Some(HeaderField::Limit),
            "remaining" => Some(HeaderField::Remaining),
            "reset" => Some(HeaderField::Reset),
            "cost" => Some(HeaderField::Cost),
            _ => Some(HeaderField::Credits),
        }
    }

    fn credits(&mut self, raw: &RawPolicy) -> Option<CreditRules> {
        let default = RawCredits::default();
        let c = raw.credits.as_ref().map_or(&default, |c| c.get_ref());
        let exhausted_status = match &c.exhausted_status {
            Some(s) => self.status(s, "exhausted_status")?,
            None => 402,
        };
        Some(CreditRules {
            exhausted_status,
            exhausted_body: c.exhausted_body.clone(),
        })
    }

    fn upstream(&mut self, raw: &RawPolicy) -> Option<UpstreamRetry> {
        let default = RawUpstream::default();
        let u = raw.upstream.as_ref().map_or(&default, |u| u.get_ref());
        let retries = match &u.retries {
            Some(r) if (0..=10).contains(r.get_ref()) => *r.get_ref() as u32,
            Some(r) => {
                self.invalid(
                    &r.span(),
                    format!("`retries` must be between 0 and 10, not {}", r.get_ref()),
                );
                0
            }
            None => 0,
        };
        let mut retry_on = Vec::new();
        match &u.retry_on {
            Some(list) => {
                for s in list {
                    if let Some(s) = self.status(s, "retry_on") {
                        retry_on.push(s);
                    }
                }
            }
            None => retry_on.extend([429, 502, 503, 504]),
        }
        let backoff = u
            .backoff
            .as_ref()
            .and_then(|d| self.duration(d, "backoff"))
            .unwrap_or(Duration::from_millis(200));
        let max_backoff = u
            .max_backoff
            .as_ref()
            .and_then(|d| self.duration(d, "max_backoff"))
            .unwrap_or(Duration::from_secs(5));
        let timeout = u
            .timeout
            .as_ref()
            .and_then(|d| self.duration(d, "timeout"))
            .unwrap_or(Duration::from_secs(60));
        let replay_body_max = u
            .replay_body_max
            .as_ref()
            .and_then(|v| self.size(v, "replay_body_max"))
            .unwrap_or(10_000_000);
        Some(UpstreamRetry {
            retries,
            retry_on,
            backoff,
            max_backoff,
            replay_body_max,
            timeout,
        })
    }
}

struct PlanBuild {
    span: Option<Range<usize>>,
    plan: Plan,
}

/// Cost of operation `op` for limit `limit`: `costs.LIMIT`, else `cost`, else 1.
fn op_cost(raw: &RawPolicy, op: &str, limit: &str) -> u64 {
    let Some(o) = raw.operations.get(op) else {
        return 1;
    };
    let o = o.get_ref();
    let v = o
        .costs
        .get(limit)
        .or(o.cost.as_ref())
        .map_or(1, |c| *c.get_ref());
    u64::try_from(v).unwrap_or(0)
}

fn cost_span(raw: &RawPolicy, op: &str, limit: &str) -> Option<Range<usize>> {
    let o = raw.operations.get(op)?.get_ref();
    o.costs.get(limit).or(o.cost.as_ref()).map(Spanned::span)
}

fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses "50MB", "30MiB", "1024" into bytes (decimal and binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDITS_FROM_HEADER: &str = r#"
[operations.render]
method = "POST"
path = "/render"
credits = 10
credits_from_header = "X-Credits-Used"

[plans.default]
"#;

    #[test]
    fn credits_from_header_is_lower_cased_and_caps_at_the_reservation() {
        let p = parse(CREDITS_FROM_HEADER, "t.toml").expect("valid");
        let op = &p.operations[usize::from(p.operation("render").expect("render"))];
        assert_eq!(op.credits_from_header.as_deref(), Some("x-credits-used"));
        assert_eq!(op.credits_used(10, Some(b"3")), 3);
        assert_eq!(op.credits_used(10, Some(b" 0 ")), 0);
        assert_eq!(op.credits_used(10, Some(b"10")), 10);
        assert_eq!(
            op.credits_used(10, Some(b"11")),
            10,
            "never above the reservation"
        );
        assert_eq!(op.credits_used(10, Some(b"99999999999999999999999")), 10);
        for bad in [&b"-1"[..], b"2.5", b"", b"abc", b"3 credits", b"\xff"] {
            assert_eq!(op.credits_used(10, Some(bad)), 10, "{bad:?}");
        }
        assert_eq!(op.credits_used(10, None), 10, "missing header");
        let plain = &p.operations[usize::from(p.default_operation())];
        assert_eq!(plain.credits_used(0, Some(b"5")), 0, "no header configured");
    }

    #[test]
    fn credits_from_header_errors_say_what_to_fix() {
        let cases = [
            (
                CREDITS_FROM_HEADER.replace("credits = 10\n", ""),
                "reserves none; set `credits`",
            ),
            (
                CREDITS_FROM_HEADER.replace("X-Credits-Used", "X Credits"),
                "is not a valid HTTP header name",
            ),
            (
                CREDITS_FROM_HEADER.replace(
                    "path = \"/render\"",
                    "path = \"/render\"\nrespond = \"balance\"",
                ),
                "answered by tollgate",
            ),
        ];
        for (src, want) in cases {
            let errors = parse(&src, "t.toml").expect_err("invalid");
            let text = errors
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(text.contains(want), "{text}");
            assert!(text.contains("t.toml:"), "located: {text}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50MB"), Some(50_000_000));
        assert_eq!(parse_size("30 MiB"), Some(30 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("5XB"), None);
    }
}
