//! Operation matching by method and path pattern.
//!
//! Patterns are `/`-separated segments: a literal (`cutout`), a parameter
//! matching one segment (`{id}`), or a final `*` matching zero or more
//! segments. A trailing `/` is ignored on both patterns and paths, so
//! `/v3/images/` and `/v3/images` are the same route.
//!
//! When several patterns match, the most specific wins, compared segment by
//! segment from the left: a literal beats a parameter, which beats `*`, and a
//! pattern that ends beats one that continues with `*`. At equal paths a named
//! method beats "any method". Two operations are *overlapping* (a policy
//! error) only when no rule separates them: the same pattern shape with the
//! same literals, and the same method or both "any".
//!
//! Patterns are kept sorted by that precedence, so matching is a scan that
//! stops at the first hit and allocates nothing.

use std::cmp::Ordering;

use super::compiled::OperationId;

/// One parsed path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(String),
    Param,
    Wildcard,
}

impl Segment {
    /// Precedence rank: higher is more specific. `END` (4) marks a pattern's end.
    fn rank(&self) -> u8 {
        match self {
            Segment::Literal(_) => 3,
            Segment::Param => 2,
            Segment::Wildcard => 1,
        }
    }
}

const END: u8 = 4;

/// A method and path pattern, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// Upper-case method, `None` for any.
    pub method: Option<String>,
    pub segments: Vec<Segment>,
    pub operation: OperationId,
    /// The pattern as written, for messages.
    pub pattern: String,
}

/// Splits a path into segments, ignoring the leading and a trailing `/`.
pub(crate) fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').filter(move |_| !trimmed.is_empty())
}

/// Parses a pattern. Errors say what is wrong, in plain words.
pub(crate) fn parse_pattern(pattern: &str) -> Result<Vec<Segment>, String> {
    if !pattern.starts_with('/') {
        return Err(format!("path pattern `{pattern}` must start with `/`"));
    }
    let parts: Vec<&str> = path_segments(pattern).collect();
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let seg = if *part == "*" {
            if i + 1 != parts.len() {
                return Err(format!("`*` may only be the last segment of `{pattern}`"));
            }
            Segment::Wildcard
        } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
            Segment::Param
        } else if part.is_empty() {
            return Err(format!(
                "path pattern `{pattern}` has an empty segment (`//`)"
            ));
        } else if part.contains(['*', '{', '}', '?', '#']) {
            return Err(format!(
                "segment `{part}` of `{pattern}` mixes text with `*`, `{{}}`, `?` or `#`; use a whole segment `*` or `{{name}}`"
            ));
        } else {
            Segment::Literal((*part).to_owned())
        };
        out.push(seg);
    }
    Ok(out)
}

impl Route {
    fn ranks(&self) -> impl Iterator<Item = u8> + '_ {
        self.segments
            .iter()
            .map(Segment::rank)
            .chain(std::iter::once(END))
    }

    /// Precedence: `Less` means `self` is tried first.
    fn precedence(&self, other: &Route) -> Ordering {
        other
            .ranks()
            .cmp(self.ranks())
            .then_with(|| other.method.is_some().cmp(&self.method.is_some()))
    }

    /// Whether no precedence rule separates the two routes.
    pub fn overlaps(&self, other: &Route) -> bool {
        self.segments == other.segments && self.method == other.method
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        if let Some(m) = &self.method
            && !m.eq_ignore_ascii_case(method)
        {
            return false;
        }
        let mut parts = path_segments(path);
        for seg in &self.segments {
            match seg {
                Segment::Wildcard => return true,
                Segment::Param => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// Routes sorted by precedence.
#[derive(Debug, Clone, Default)]
pub(crate) struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        routes.sort_by(Route::precedence);
        Router { routes }
    }

    pub fn find(&self, method: &str, path: &str) -> Option<OperationId> {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .map(|r| r.operation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Option<&str>, pattern: &str, op: OperationId) -> Route {
        Route {
            method: method.map(str::to_owned),
            segments: parse_pattern(pattern).unwrap(),
            operation: op,
            pattern: pattern.to_owned(),
        }
    }

    #[test]
    fn most_specific_wins() {
        let r = Router::new(vec![
            route(Some("POST"), "/*", 0),
            route(Some("POST"), "/sensei/cutout", 1),
            route(Some("GET"), "/api/assets/{id}", 2),
            route(Some("GET"), "/api/assets/{id}/thumbnail", 3),
            route(Some("GET"), "/api/assets", 4),
            route(None, "/v3/images/", 5),
        ]);
        assert_eq!(r.find("POST", "/sensei/cutout"), Some(1));
        assert_eq!(r.find("POST", "/anything/else"), Some(0));
        assert_eq!(r.find("POST", "/"), Some(0));
        assert_eq!(r.find("GET", "/api/assets/42"), Some(2));
        assert_eq!(r.find("GET", "/api/assets/42/thumbnail"), Some(3));
        assert_eq!(r.find("GET", "/api/assets"), Some(4));
        assert_eq!(r.find("GET", "/api/assets/"), Some(4));
        assert_eq!(r.find("PUT", "/v3/images"), Some(5));
        assert_eq!(r.find("GET", "/nothing"), None);
    }

    #[test]
    fn named_method_beats_any() {
        let r = Router::new(vec![route(None, "/a", 0), route(Some("GET"), "/a", 1)]);
        assert_eq!(r.find("GET", "/a"), Some(1));
        assert_eq!(r.find("POST", "/a"), Some(0));
    }

    #[test]
    fn overlap_only_when_nothing_separates() {
        assert!(route(Some("GET"), "/a/{x}", 0).overlaps(&route(Some("GET"), "/a/{y}/", 1)));
        assert!(!route(Some("GET"), "/a/{x}", 0).overlaps(&route(Some("POST"), "/a/{y}", 1)));
        assert!(!route(Some("GET"), "/a/*", 0).overlaps(&route(Some("GET"), "/a/{y}", 1)));
    }

    #[test]
    fn bad_patterns_explained() {
        assert!(
            parse_pattern("a/b")
                .unwrap_err()
                .contains("must start with")
        );
        assert!(
            parse_pattern("/a/*/b")
                .unwrap_err()
                .contains("last segment")
        );
        assert!(parse_pattern("/a/x*").unwrap_err().contains("mixes"));
    }
}
