//! Label selectors and the one matching rule that overlay networks, drive policies, budgets,
//! windows, rollouts, backup jobs and the `-l` filters share; label key and value rules; and the
//! name rule for operator-named things.
//!
//! The syntax and semantics are Kubernetes': a selector is a comma-separated list of terms, all of
//! which must hold (an AND):
//!
//! | term              | a node matches when                                   |
//! |-------------------|-------------------------------------------------------|
//! | `key=value`       | it has the label with this value (`==` too)           |
//! | `key!=value`      | it lacks the label, or has another value              |
//! | `key`             | it has the label                                      |
//! | `!key`            | it lacks the label                                    |
//! | `key in (a,b)`    | it has the label with one of the values               |
//! | `key notin (a,b)` | it lacks the label, or has none of the values         |
//!
//! Keys and values follow [`valid_label_key`] and [`valid_label_value`]. What a client sends is
//! bounded before it is looked at: [`MAX_SELECTOR_LEN`] bytes, [`MAX_TERMS`] terms,
//! [`MAX_SET_VALUES`] values per set.
//!
//! A selector has one canonical form ([`Selector`]'s `Display`): terms sorted by key and operator,
//! duplicates dropped, set values sorted. Two selectors that select alike by construction
//! (`b=2,a=1` and `a=1,b=2`) are the same record.
//!
//! **Stored form.** Records written before multi-term selectors hold a selector as a `(key, value)`
//! pair of strings. In the store's encoding (postcard, not human-readable) a [`Selector`] is still
//! that pair: a single `key=value` term is written exactly as before, any other selector as
//! `("", canonical text)` — an empty key, which the old form never held. Old records read unchanged
//! (migrate on read), and a controller of the previous version sharing the store reads a new
//! single-term selector right and a multi-term one as a selector that matches no node. In JSON a
//! selector is its canonical text.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Longest selector text accepted, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;
/// Most terms in one selector.
pub const MAX_TERMS: usize = 32;
/// Most values in one `in`/`notin` set.
pub const MAX_SET_VALUES: usize = 64;
/// Longest label key: a 253-byte DNS-subdomain prefix, `/`, a 63-byte name.
pub const MAX_LABEL_KEY_LEN: usize = 253 + 1 + 63;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Term {
    /// `key=value`: the label is there with this value.
    Equals(String, String),
    /// `key!=value`: the label is absent or has another value.
    NotEquals(String, String),
    /// `key`: the label is there.
    Exists(String),
    /// `!key`: the label is absent.
    NotExists(String),
    /// `key in (v,…)`: the label is there with one of these values.
    In(String, BTreeSet<String>),
    /// `key notin (v,…)`: the label is absent or has none of these values.
    NotIn(String, BTreeSet<String>),
}

impl Term {
    /// The label key the term is about.
    pub fn key(&self) -> &str {
        match self {
            Term::Equals(k, _)
            | Term::NotEquals(k, _)
            | Term::Exists(k)
            | Term::NotExists(k)
            | Term::In(k, _)
            | Term::NotIn(k, _) => k,
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Term::Equals(..) => 0,
            Term::NotEquals(..) => 1,
            Term::Exists(_) => 2,
            Term::NotExists(_) => 3,
            Term::In(..) => 4,
            Term::NotIn(..) => 5,
        }
    }

    /// Whether the term holds for these labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        }
    }
}

impl Ord for Term {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let values = |t: &Term| -> Vec<String> {
            match t {
                Term::Equals(_, v) | Term::NotEquals(_, v) => vec![v.clone()],
                Term::Exists(_) | Term::NotExists(_) => Vec::new(),
                Term::In(_, vs) | Term::NotIn(_, vs) => vs.iter().cloned().collect(),
            }
        };
        (self.key(), self.rank())
            .cmp(&(other.key(), other.rank()))
            .then_with(|| values(self).cmp(&values(other)))
    }
}

impl PartialOrd for Term {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Term::Equals(k, v) => write!(f, "{k}={v}"),
            Term::NotEquals(k, v) => write!(f, "{k}!={v}"),
            Term::Exists(k) => write!(f, "{k}"),
            Term::NotExists(k) => write!(f, "!{k}"),
            Term::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Term::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
        }
    }
}

/// A label selector: terms that must all hold, in canonical order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    /// The selector `key=value` (no checks: it is also how records of the old form are read).
    pub fn equals(key: impl Into<String>, value: impl Into<String>) -> Selector {
        Selector {
            terms: vec![Term::Equals(key.into(), value.into())],
        }
    }

    /// A selector of these terms (sorted, duplicates dropped); `None` without any.
    pub fn from_terms(mut terms: Vec<Term>) -> Option<Selector> {
        terms.sort();
        terms.dedup();
        (!terms.is_empty()).then_some(Selector { terms })
    }

    /// Its terms, in canonical order.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Whether every term holds for these labels.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| t.matches(labels))
    }

    /// The old stored form, `(key, value)`, when the selector is one `key=value` term.
    fn as_pair(&self) -> Option<(&str, &str)> {
        match self.terms.as_slice() {
            [Term::Equals(k, v)] if !k.is_empty() => Some((k, v)),
            _ => None,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_selector(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return s.collect_str(self);
        }
        // See the module docs: the old `(key, value)` pair, or `("", text)`.
        match self.as_pair() {
            Some(pair) => pair.serialize(s),
            None => ("", self.to_string()).serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            return parse_selector(&text).map_err(de::Error::custom);
        }
        let (key, value) = <(String, String)>::deserialize(d)?;
        if key.is_empty() {
            parse_selector(&value).map_err(de::Error::custom)
        } else {
            // A record of the old form, kept as it was written (its value may predate the rules).
            Ok(Selector::equals(key, value))
        }
    }
}

/// Why a selector was refused. Each says where and what, so the operator can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// Nothing but blanks.
    #[error("empty selector: give at least one term (KEY=VALUE, KEY!=VALUE, KEY, !KEY, KEY in (A,B), KEY notin (A,B))")]
    Empty,
    /// Over [`MAX_SELECTOR_LEN`] bytes.
    #[error("selector is {len} bytes long; at most {MAX_SELECTOR_LEN} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Over [`MAX_TERMS`] terms.
    #[error("selector has more than {MAX_TERMS} terms")]
    TooManyTerms,
    /// A set with over [`MAX_SET_VALUES`] values.
    #[error("the set of {key:?} has more than {MAX_SET_VALUES} values")]
    TooManyValues {
        /// The term's key.
        key: String,
    },
    /// Not the grammar.
    #[error("selector {text:?}, at byte {at}: expected {expected}, found {found}")]
    Syntax {
        /// The whole selector.
        text: String,
        /// Byte offset of the problem.
        at: usize,
        /// What the grammar wanted.
        expected: &'static str,
        /// What was there (`end of input` at the end).
        found: String,
    },
    /// An `in`/`notin` set without values.
    #[error("the set of {key:?} is empty; `in`/`notin` need at least one value")]
    EmptySet {
        /// The term's key.
        key: String,
    },
    /// A key outside the label key rules.
    #[error(transparent)]
    Label(#[from] LabelError),
}

/// A label key or value outside the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// See [`valid_label_key`].
    #[error(
        "label key {0:?} is not allowed: use NAME or PREFIX/NAME, NAME 1 to 63 of a-z, A-Z, 0-9, '-', '_', '.' \
         starting and ending alphanumeric, PREFIX a DNS subdomain (lower case, at most 253)"
    )]
    BadKey(String),
    /// See [`valid_label_value`].
    #[error(
        "label value {0:?} is not allowed: use at most 63 of a-z, A-Z, 0-9, '-', '_', '.', ':' starting and \
         ending alphanumeric (or the empty value)"
    )]
    BadValue(String),
}

/// Whether `key` is a label key: `NAME` or `PREFIX/NAME`, `NAME` 1 to 63 of `[A-Za-z0-9._-]`
/// starting and ending alphanumeric, `PREFIX` a DNS subdomain (lower-case labels of
/// `[a-z0-9-]` joined by dots, at most 253 bytes) — Kubernetes' rule.
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = (1..=63).contains(&name.len()) && alnum_ends(name, b"._-");
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    name_ok && prefix_ok
}

/// Whether `value` is a label value: empty, or 1 to 63 of `[A-Za-z0-9._:-]` starting and ending
/// alphanumeric — Kubernetes' rule with `:` added, so MAC addresses (`netboot.mac`) are values.
pub fn valid_label_value(value: &str) -> bool {
    value.is_empty() || (value.len() <= MAX_LABEL_VALUE_LEN && alnum_ends(value, b"._:-"))
}

fn alnum_ends(s: &str, inner: &[u8]) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(f), Some(l)) => {
            f.is_ascii_alphanumeric()
                && l.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || inner.contains(c))
        }
        _ => false,
    }
}

/// A key, checked.
pub fn check_label_key(key: &str) -> Result<(), LabelError> {
    if valid_label_key(key) {
        Ok(())
    } else {
        Err(LabelError::BadKey(key.to_owned()))
    }
}

/// A value, checked.
pub fn check_label_value(value: &str) -> Result<(), LabelError> {
    if valid_label_value(value) {
        Ok(())
    } else {
        Err(LabelError::BadValue(value.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    Comma,
    Open,
    Close,
    Bang,
    Eq,
    NotEq,
}

impl Token<'_> {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Comma => "','".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Bang => "'!'".into(),
            Token::Eq => "'='".into(),
            Token::NotEq => "'!='".into(),
        }
    }
}

/// Splits selector text into tokens with their byte offsets. A word is a run of anything but
/// blanks and `,()!=`; the key and value rules judge it later.
fn tokens(s: &str) -> Vec<(usize, Token<'_>)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let tok = match c {
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b',' => Token::Comma,
            b'(' => Token::Open,
            b')' => Token::Close,
            b'!' if b.get(i + 1) == Some(&b'=') => Token::NotEq,
            b'!' => Token::Bang,
            b'=' => Token::Eq,
            _ => {
                let start = i;
                while i < b.len() && !b[i].is_ascii_whitespace() && !b",()!=".contains(&b[i]) {
                    i += 1;
                }
                out.push((start, Token::Word(&s[start..i])));
                continue;
            }
        };
        let len = match tok {
            Token::NotEq => 2,
            Token::Eq if b.get(i + 1) == Some(&b'=') => 2,
            _ => 1,
        };
        out.push((i, tok));
        i += len;
    }
    out
}

struct Parser<'a> {
    text: &'a str,
    tokens: Vec<(usize, Token<'a>)>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&Token<'a>> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn next(&mut self) -> Option<Token<'a>> {
        let t = self.tokens.get(self.pos).map(|(_, t)| t.clone());
        self.pos += 1;
        t
    }

    fn error(&self, expected: &'static str) -> SelectorError {
        let (at, found) = match self.tokens.get(self.pos) {
            Some((at, t)) => (*at, t.describe()),
            None => (self.text.len(), "end of input".to_owned()),
        };
        SelectorError::Syntax {
            text: self.text.to_owned(),
            at,
            expected,
            found,
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let w = (*w).to_owned();
                check_label_key(&w)?;
                self.pos += 1;
                Ok(w)
            }
            _ => Err(self.error("a label key")),
        }
    }

    /// A value after `=`/`!=`: a word, or nothing (the empty value) before `,` or the end.
    fn value(&mut self) -> Result<String, SelectorError> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let w = (*w).to_owned();
                check_label_value(&w)?;
                self.pos += 1;
                Ok(w)
            }
            None | Some(Token::Comma) => Ok(String::new()),
            _ => Err(self.error("a label value")),
        }
    }

    fn set(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        if self.next() != Some(Token::Open) {
            self.pos -= 1;
            return Err(self.error("'(' to open the set of values"));
        }
        let mut values = BTreeSet::new();
        if self.peek() == Some(&Token::Close) {
            return Err(SelectorError::EmptySet {
                key: key.to_owned(),
            });
        }
        loop {
            match self.next() {
                Some(Token::Word(w)) => {
                    check_label_value(w)?;
                    values.insert(w.to_owned());
                    if values.len() > MAX_SET_VALUES {
                        return Err(SelectorError::TooManyValues {
                            key: key.to_owned(),
                        });
                    }
                }
                _ => {
                    self.pos -= 1;
                    return Err(self.error("a value in the set"));
                }
            }
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::Close) => return Ok(values),
                _ => {
                    self.pos -= 1;
                    return Err(self.error("',' or ')' in the set of values"));
                }
            }
        }
    }

    fn term(&mut self) -> Result<Term, SelectorError> {
        if self.peek() == Some(&Token::Bang) {
            self.pos += 1;
            return Ok(Term::NotExists(self.key()?));
        }
        let key = self.key()?;
        match self.peek() {
            None | Some(Token::Comma) => Ok(Term::Exists(key)),
            Some(Token::Eq) => {
                self.pos += 1;
                Ok(Term::Equals(key, self.value()?))
            }
            Some(Token::NotEq) => {
                self.pos += 1;
                Ok(Term::NotEquals(key, self.value()?))
            }
            Some(Token::Word("in")) => {
                self.pos += 1;
                let set = self.set(&key)?;
                Ok(Term::In(key, set))
            }
            Some(Token::Word("notin")) => {
                self.pos += 1;
                let set = self.set(&key)?;
                Ok(Term::NotIn(key, set))
            }
            _ => Err(self.error("'=', '!=', 'in', 'notin', ',' or the end after a key")),
        }
    }
}

/// Parses a selector (see the module docs for the grammar); bounded before anything is read.
pub fn parse_selector(s: &str) -> Result<Selector, SelectorError> {
    if s.len() > MAX_SELECTOR_LEN {
        return Err(SelectorError::TooLong { len: s.len() });
    }
    let mut p = Parser {
        text: s,
        tokens: tokens(s),
        pos: 0,
    };
    if p.tokens.is_empty() {
        return Err(SelectorError::Empty);
    }
    let mut terms = Vec::new();
    loop {
        if terms.len() == MAX_TERMS {
            return Err(SelectorError::TooManyTerms);
        }
        terms.push(p.term()?);
        match p.next() {
            None => break,
            Some(Token::Comma) => {}
            Some(_) => {
                p.pos -= 1;
                return Err(p.error("',' between terms"));
            }
        }
    }
    Selector::from_terms(terms).ok_or(SelectorError::Empty)
}

/// Whether `name` fits `[a-z0-9][a-z0-9-]{0,30}` (networks, windows).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=31).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        parse_selector(s).unwrap()
    }

    #[test]
    fn every_operator_parses_and_prints_canonically() {
        for (text, canonical) in [
            ("role=db", "role=db"),
            ("role==db", "role=db"),
            (" role = db ", "role=db"),
            ("role!=db", "role!=db"),
            ("gpu", "gpu"),
            ("!gpu", "!gpu"),
            ("! gpu", "!gpu"),
            ("zone in (b, a)", "zone in (a,b)"),
            ("zone notin (a)", "zone notin (a)"),
            ("role=", "role="),
            ("b=2,a=1", "a=1,b=2"),
            ("a=1,a=1", "a=1"),
            (
                "example.com/tier=gold,!spot,zone in (x,y),role!=web",
                "example.com/tier=gold,role!=web,!spot,zone in (x,y)",
            ),
            (
                "netboot.mac=52:54:00:00:00:01",
                "netboot.mac=52:54:00:00:00:01",
            ),
        ] {
            let s = sel(text);
            assert_eq!(s.to_string(), canonical, "{text}");
            assert_eq!(sel(canonical), s, "canonical text re-parses: {canonical}");
        }
    }

    #[test]
    fn kubernetes_semantics() {
        let db_a = labels(&[("role", "db"), ("zone", "a")]);
        let web = labels(&[("role", "web")]);
        let none = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("role=db", [true, false, false]),
            ("role!=db", [false, true, true]),
            ("zone", [true, false, false]),
            ("!zone", [false, true, true]),
            ("role in (db,cache)", [true, false, false]),
            ("role notin (db,cache)", [false, true, true]),
            ("role=db,zone=a", [true, false, false]),
            ("role=db,zone=b", [false, false, false]),
            ("role,!zone", [false, true, false]),
            ("role=", [false, false, false]),
        ];
        for (text, expected) in cases {
            let s = sel(text);
            let got = [s.matches(&db_a), s.matches(&web), s.matches(&none)];
            assert_eq!(&got, expected, "{text}");
        }
        assert!(sel("role=").matches(&labels(&[("role", "")])));
    }

    #[test]
    fn errors_say_where_and_what() {
        let err = |s: &str| parse_selector(s).unwrap_err().to_string();
        assert!(err("").contains("empty selector"));
        assert!(err("  ").contains("empty selector"));
        assert_eq!(
            err("role=db zone=a"),
            "selector \"role=db zone=a\", at byte 8: expected ',' between terms, found \"zone\""
        );
        assert!(
            err("zone in a").contains("expected '(' to open the set"),
            "{}",
            err("zone in a")
        );
        assert!(err("zone in (a").contains("found end of input"));
        assert!(err("zone in (a b)").contains("',' or ')'"));
        assert!(err("zone in ()").contains("is empty"));
        assert!(err("zone in (a,)").contains("a value in the set"));
        assert!(err("=db").contains("expected a label key"));
        assert!(err("role=db,").contains("expected a label key, found end of input"));
        assert_eq!(sel("role=="), sel("role="));
        assert!(err("-role=db").contains("label key \"-role\" is not allowed"));
        assert!(err("role=a b").contains("',' between terms"));
        assert!(err("role=db)").contains("expected ',' between terms, found ')'"));
        assert!(err("role=db!").contains("found '!'"));
        assert!(err("role=d$b").contains("label value \"d$b\" is not allowed"));
        assert!(err("Example.com/x=1").contains("label key"));
    }

    #[test]
    fn bounds_are_checked() {
        let long = format!("k={}", "a".repeat(MAX_SELECTOR_LEN));
        assert_eq!(
            parse_selector(&long),
            Err(SelectorError::TooLong { len: long.len() })
        );
        let many: Vec<String> = (0..=MAX_TERMS).map(|i| format!("k{i}")).collect();
        assert_eq!(
            parse_selector(&many.join(",")),
            Err(SelectorError::TooManyTerms)
        );
        assert!(parse_selector(&many[..MAX_TERMS].join(",")).is_ok());
        let values: Vec<String> = (0..=MAX_SET_VALUES).map(|i| format!("v{i}")).collect();
        assert_eq!(
            parse_selector(&format!("k in ({})", values.join(","))),
            Err(SelectorError::TooManyValues { key: "k".into() })
        );
        assert!(parse_selector(&format!("k in ({})", values[..MAX_SET_VALUES].join(","))).is_ok());
        assert!(parse_selector(&format!("k={}", "v".repeat(64))).is_err());
        assert!(parse_selector(&format!("k={}", "v".repeat(63))).is_ok());
    }

    #[test]
    fn label_rules() {
        for ok in [
            "role",
            "a",
            "A_b.c-d",
            "example.com/role",
            "netboot.mac",
            &"x".repeat(63),
        ] {
            assert!(valid_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a b",
            "/role",
            "Example.com/role",
            "a/b/c",
            "ex..com/r",
            &"x".repeat(64),
            "é",
        ] {
            assert!(!valid_label_key(bad), "{bad}");
        }
        for ok in ["", "db", "52:54:00:00:00:01", "a.b_c-d", &"v".repeat(63)] {
            assert!(valid_label_value(ok), "{ok}");
        }
        for bad in ["-a", "a ", "a,b", "a=b", "(a)", &"v".repeat(64)] {
            assert!(!valid_label_value(bad), "{bad}");
        }
    }

    /// What the store held before multi-term selectors: a `(key, value)` pair.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct OldRecord {
        name: String,
        selectors: Vec<(String, String)>,
        one: Option<(String, String)>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct NewRecord {
        name: String,
        selectors: Vec<Selector>,
        one: Option<Selector>,
    }

    #[test]
    fn records_of_the_old_encoding_read_and_single_terms_write_as_before() {
        let old = OldRecord {
            name: "n".into(),
            // A value the new rules refuse still reads, and matches as it did.
            selectors: vec![("role".into(), "db".into()), ("odd".into(), "a b".into())],
            one: Some(("zone".into(), "1".into())),
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        let new: NewRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            new.selectors,
            vec![
                Selector::equals("role", "db"),
                Selector::equals("odd", "a b")
            ]
        );
        assert!(new.selectors[1].matches(&labels(&[("odd", "a b")])));
        assert_eq!(new.one, Some(sel("zone=1")));
        // A single-term selector is written byte for byte as the old form.
        assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes);
        // A multi-term one reads back, and an old reader sees a pair with an empty key.
        let multi = NewRecord {
            name: "n".into(),
            selectors: vec![sel("role in (db,cache),!spot")],
            one: None,
        };
        let bytes = postcard::to_allocvec(&multi).unwrap();
        assert_eq!(postcard::from_bytes::<NewRecord>(&bytes).unwrap(), multi);
        let seen_by_old: OldRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            seen_by_old.selectors,
            vec![(String::new(), "role in (cache,db),!spot".into())]
        );
    }

    #[test]
    fn json_is_the_canonical_text() {
        let s = sel("b=2,a in (y,x)");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"a in (x,y),b=2\"");
        assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), s);
        assert!(serde_json::from_str::<Selector>("\"a in ()\"").is_err());
    }

    #[test]
    fn names() {
        assert!(valid_name("net-1"));
        assert!(!valid_name("-net"));
        assert!(!valid_name(&"a".repeat(32)));
    }
}
