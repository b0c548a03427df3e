//! A `POST /v1/check` body read without serde when it has the usual shape:
//! a flat JSON object of the request's fields, strings without escapes.
//!
//! Why: `serde_json` with the derived `Deserialize` spent about 1,600
//! instructions on a 50-byte body (field-name visitors, `Option` and `&str`
//! visitors, the unknown-field check), a fifth of the check's own work.
//! This reader walks the bytes once. It gives an answer only where it gives
//! the value serde would ([`parse_into`]); anything else (every invalid body, an
//! escaped string, a float, `-0`) is left to serde, so each answer and error
//! message is unchanged.

use std::collections::BTreeMap;

use super::CheckRequest;

/// [`parse_into`] into a new check (the tests' form).
#[cfg(test)]
fn parse(body: &str) -> Option<CheckRequest<&str>> {
    let mut req = empty();
    parse_into(body, &mut req).then_some(req)
}

/// A check with no field (what [`parse_into`] starts from).
pub(super) fn empty<'b>() -> CheckRequest<&'b str> {
    CheckRequest {
        key: None,
        account: None,
        operation: None,
        method: None,
        path: None,
        ip: None,
        attributes: BTreeMap::new(),
        cost: None,
    }
}

/// Reads `body` into `req` (as [`empty`] gives it, so the check is not
/// moved out) as serde reads it into a [`CheckRequest`], when it is a JSON
/// object (surrounded by JSON whitespace at most) whose members are fields of
/// the request, each at most once, and whose values are:
/// - for the string fields, a string without `\` or control characters, or
///   `null` (no value, as serde reads it for an `Option`);
/// - for `cost`, an integer of at most 18 digits (so within `i64`), not
///   `-0`, or `null`;
/// - for `attributes`, an object of such strings (a later value of a name
///   replacing an earlier one, as serde's map does).
///
/// `true` when read; `false` for any other body, valid or not (then `req`
/// holds some fields, and serde reads the body).
pub(super) fn parse_into<'b>(body: &'b str, req: &mut CheckRequest<&'b str>) -> bool {
    read(body, req).is_some()
}

fn read<'b>(body: &'b str, req: &mut CheckRequest<&'b str>) -> Option<()> {
    let mut r = Reader { body, at: 0 };
    // One bit per field: a field named twice is serde's error.
    let mut seen = 0u8;
    r.ws();
    r.expect(b'{')?;
    r.ws();
    if !r.eat(b'}') {
        loop {
            let name = r.string()?;
            r.ws();
            r.expect(b':')?;
            r.ws();
            let bit = match name {
                "key" => r.string_or_null(&mut req.key, 1)?,
                "account" => r.string_or_null(&mut req.account, 2)?,
                "operation" => r.string_or_null(&mut req.operation, 4)?,
                "method" => r.string_or_null(&mut req.method, 8)?,
                "path" => r.string_or_null(&mut req.path, 16)?,
                "ip" => r.string_or_null(&mut req.ip, 32)?,
                "cost" => {
                    req.cost = r.cost()?;
                    64
                }
                "attributes" => {
                    req.attributes = r.attributes()?;
                    128
                }
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            r.ws();
            if r.eat(b',') {
                r.ws();
                continue;
            }
            r.expect(b'}')?;
            break;
        }
    }
    r.ws();
    (r.at == body.len()).then_some(())
}

/// The body and where reading is.
struct Reader<'b> {
    body: &'b str,
    at: usize,
}

impl<'b> Reader<'b> {
    fn peek(&self) -> Option<u8> {
        self.body.as_bytes().get(self.at).copied()
    }

    /// Skips JSON whitespace (as serde_json: space, tab, newline, return).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Whether `b` is next (then read).
    fn eat(&mut self, b: u8) -> bool {
        let next = self.peek() == Some(b);
        self.at += usize::from(next);
        next
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    /// Whether `word` is next (then read).
    fn eat_word(&mut self, word: &[u8]) -> bool {
        let next = self.body.as_bytes()[self.at..].starts_with(word);
        if next {
            self.at += word.len();
        }
        next
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'b str> {
        self.expect(b'"')?;
        let start = self.at;
        let bytes = self.body.as_bytes();
        // Eight bytes at a time: the lowest byte the word's mask flags is
        // the first `"`, `\` or control character (see `answer::escapes`),
        // where the string ends or is refused; the last few bytes one by one.
        loop {
            let Some(&[b0, b1, b2, b3, b4, b5, b6, b7]) = bytes.get(self.at..self.at + 8) else {
                while !matches!(*bytes.get(self.at)?, b'"' | b'\\' | 0..=0x1F) {
                    self.at += 1;
                }
                break;
            };
            let stops =
                super::answer::escapes(u64::from_le_bytes([b0, b1, b2, b3, b4, b5, b6, b7]));
            if stops != 0 {
                self.at += (stops.trailing_zeros() / 8) as usize;
                break;
            }
            self.at += 8;
        }
        if *bytes.get(self.at)? != b'"' {
            return None;
        }
        let s = self.body.get(start..self.at)?;
        self.at += 1;
        Some(s)
    }

    /// [`Reader::string`] into `field`, or `null` as no value; `bit` back.
    fn string_or_null(&mut self, field: &mut Option<&'b str>, bit: u8) -> Option<u8> {
        *field = if self.eat_word(b"null") {
            None
        } else {
            Some(self.string()?)
        };
        Some(bit)
    }

    /// An integer of at most 18 digits, not `-0`, or `null`.
    fn cost(&mut self) -> Option<Option<i64>> {
        if self.eat_word(b"null") {
            return Some(None);
        }
        let negative = self.eat(b'-');
        let bytes = self.body.as_bytes();
        let start = self.at;
        let mut v: i64 = 0;
        while let Some(&d @ b'0'..=b'9') = bytes.get(self.at) {
            if self.at - start == 18 {
                return None;
            }
            v = v * 10 + i64::from(d - b'0');
            self.at += 1;
        }
        let digits = self.at - start;
        // Serde's errors (leading zero, no digits), `-0`, or a float.
        let zero_first = bytes.get(start) == Some(&b'0');
        if digits == 0
            || (zero_first && (digits > 1 || negative))
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some(Some(if negative { -v } else { v }))
    }

    /// An object of strings.
    fn attributes(&mut self) -> Option<BTreeMap<&'b str, &'b str>> {
        let mut map = BTreeMap::new();
        self.expect(b'{')?;
        self.ws();
        if self.eat(b'}') {
            return Some(map);
        }
        loop {
            let name = self.string()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            map.insert(name, self.string()?);
            self.ws();
            if self.eat(b',') {
                self.ws();
                continue;
            }
            self.expect(b'}')?;
            return Some(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What serde reads from `body` (as the check did before this reader).
    fn serde(body: &str) -> Option<CheckRequest<&str>> {
        serde_json::from_str(body).ok()
    }

    fn same(body: &str) -> Result<(), TestCaseError> {
        if let Some(fast) = parse(body) {
            let Some(slow) = serde(body) else {
                return Err(TestCaseError::fail(format!(
                    "serde refuses {body:?}, read as {fast:?}"
                )));
            };
            prop_assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{}", body);
        }
        Ok(())
    }

    #[test]
    fn usual_bodies_are_read_as_serde_reads_them() {
        for body in [
            r#"{"account":"bench","operation":"default","cost":0}"#,
            r#"{"key":"tg_abc","operation":"search","cost":12}"#,
            r#" { "account" : "a" , "method" : "GET", "path":"/x/y" ,"ip":"10.0.0.1"} "#,
            "{\n\t\"account\":\"a\",\r\n\"attributes\":{\"tier\":\"gold\",\"region\":\"eu\"}}",
            r#"{"account":"a","attributes":{}}"#,
            r#"{"account":"a","attributes":{"x":"1","x":"2"}}"#,
            r#"{"account":null,"key":"k","cost":null}"#,
            r#"{"account":"a","cost":-5}"#,
            r#"{"account":"a","cost":999999999999999999}"#,
            r#"{"account":"é ünïcode ✓","operation":""}"#,
            "{}",
        ] {
            let fast = parse(body);
            assert!(fast.is_some(), "not read: {body}");
            assert_eq!(format!("{fast:?}"), format!("{:?}", serde(body)), "{body}");
        }
    }

    #[test]
    fn other_bodies_are_left_to_serde() {
        for body in [
            // Errors serde words.
            "",
            "[]",
            "null",
            r#"{"account":"a""#,
            r#"{"account":"a",}"#,
            r#"{"account":"a"} x"#,
            r#"{"account":"a","bogus":1}"#,
            r#"{"account":"a","account":"b"}"#,
            r#"{"cost":1,"cost":1}"#,
            r#"{"attributes":{},"attributes":{}}"#,
            r#"{"account":1}"#,
            r#"{"cost":"1"}"#,
            r#"{"cost":01}"#,
            r#"{"cost":-}"#,
            r#"{"cost":1.5}"#,
            r#"{"cost":1e3}"#,
            r#"{"cost":9999999999999999999999}"#,
            r#"{"attributes":null}"#,
            r#"{"attributes":{"a":null}}"#,
            r#"{"attributes":{"a":1}}"#,
            "{\"account\":\"a\tb\"}",
            // Valid, but not this reader's to read.
            r#"{"account":"a\"b"}"#,
            r#"{"\u0061ccount":"a"}"#,
            r#"{"cost":-0}"#,
            r#"{"cost":1234567890123456789}"#,
        ] {
            assert!(parse(body).is_none(), "read: {body}");
        }
    }

    /// Pieces of check bodies, valid and not, put together at random.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just(" ".to_owned()),
            Just("\n".to_owned()),
            Just("null".to_owned()),
            Just("nul".to_owned()),
            prop_oneof![
                Just("key"),
                Just("account"),
                Just("operation"),
                Just("method"),
                Just("path"),
                Just("ip"),
                Just("cost"),
                Just("attributes"),
                Just("other"),
            ]
            .prop_map(|f| format!("\"{f}\"")),
            "\"[a-z\\\\\"\t é]{0,20}\"",
            "-?[0-9]{1,20}(\\.[0-9])?(e[0-9])?",
        ]
    }

    proptest! {
        #[test]
        fn the_lowest_byte_flagged_is_the_first_that_stops_a_string(
            word in proptest::array::uniform8(prop_oneof![
                Just(b'"'),
                Just(b'\\'),
                0u8..0x20,
                any::<u8>(),
            ]),
        ) {
            let flags = super::super::answer::escapes(u64::from_le_bytes(word));
            let first = word.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            prop_assert_eq!((flags != 0).then(|| (flags.trailing_zeros() / 8) as usize), first);
        }

        #[test]
        fn any_body_read_is_read_as_serde_reads_it(
            pieces in proptest::collection::vec(piece(), 0..24),
        ) {
            same(&pieces.concat())?;
        }

        #[test]
        fn any_well_formed_check_is_read_as_serde_reads_it(
            fields in proptest::collection::vec(
                (0..8usize, "[a-z0-9 ./é]{0,24}", -1_000_000i64..1_000_000, 0..3usize),
                0..6,
            ),
        ) {
            let names = ["key", "account", "operation", "method", "path", "ip", "cost", "attributes"];
            let members: Vec<String> = fields
                .iter()
                .map(|(f, s, n, a)| {
                    let value = match names[*f] {
                        "cost" => n.to_string(),
                        "attributes" => {
                            let attrs: Vec<String> =
                                (0..*a).map(|i| format!("\"a{i}\":\"{s}\"")).collect();
                            format!("{{{}}}", attrs.join(","))
                        }
                        _ => format!("\"{s}\""),
                    };
                    format!("\"{}\":{value}", names[*f])
                })
                .collect();
            let body = format!("{{{}}}", members.join(","));
            let mut seen = std::collections::HashSet::new();
            let unique = fields.iter().all(|(f, ..)| seen.insert(*f));
            // Each field once: read here, as serde reads it.
            prop_assert_eq!(parse(&body).is_some(), unique, "{}", body);
            same(&body)?;
        }
    }
}
