//! Company matching: the canonical company key of a CRM row.
//!
//! Two partners rarely spell a company the same way: `https://WWW.ACME.CO.UK/about`,
//! `shop.acme.co.uk` and `acme.co.uk.` are one company, and so are `ACME Systems, Inc.` and
//! `Acme Systems`. A row's company key is
//!
//! - `d:` + the **registrable domain** of its website (public-suffix aware, so `acme.co.uk`
//!   and not `co.uk`; IDNA to punycode; scheme, `www` and other subdomains, port, path,
//!   query, fragment, credentials, trailing dot, case and surrounding spaces stripped; an
//!   e-mail address counts by its domain), unless that domain is shared by many unrelated
//!   companies (free mail, social networks, site builders): those identify nobody;
//! - otherwise `n:` + the **normalised name** (Unicode compatibility-decomposed, accents and
//!   case dropped, `&` read as `and`, punctuation removed, a leading `the` and trailing legal
//!   forms such as `Inc`, `GmbH`, `S.A.` removed, spacing collapsed), if a name column is given;
//! - otherwise none: the row is *unmatched* (counted, never joined, never one giant group).
//!
//! With a name column, every row that has a name also gets a hidden **name key** (the `n:`
//! key it would have without a website; with name-context columns, their normalised values
//! are part of it, so a name alone never decides). The overlap engine uses it to fold a
//! name-only row into the one company of its list with that name, and to link a name-only
//! company to the one company of the other list with that name (query/src/overlap.rs).
//!
//! The public suffix list is Mozilla's, compiled in by the `psl` crate; URLs are parsed by
//! the `url` crate (WHATWG host parsing, IDNA included). Known failure modes are documented
//! in docs/MATCHING.md.

use std::borrow::Cow;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, StringArray};
use arrow_schema::{ArrowError, DataType};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// The column, sealed with a dataset, that holds each row's company key. Hidden from users:
/// queries join and count through it (see `queries.rs`), names starting with `__escrow` are
/// refused in uploads.
pub const COMPANY_KEY: &str = "__escrow_company";

/// The hidden column, sealed with a dataset that has a name column, that holds each row's
/// name key (null for rows without a name, or with a context value missing).
pub const NAME_KEY: &str = "__escrow_name";

/// The hidden column, sealed with a dataset that has a name column and place columns (a
/// country, a region, a state: detected by their header or given with `--places`), that
/// holds each row's place: its normalised place values (null when one is missing). A name
/// link is refused when both companies have one known place and the places differ.
pub const PLACE_KEY: &str = "__escrow_place";

/// Field metadata of [`PLACE_KEY`]: the kinds of its place columns ([`place_kind`]), sorted,
/// comma-separated. Places of two lists are compared only when their kinds are the same.
pub const PLACE_KINDS: &str = "escrow.place_kinds";

/// Hidden columns sealed with a keyed dataset when the uploader's server gives the query
/// engine's id hash ([`StoredIds`]): the entity ids of each row's company key (or key text),
/// name key and place, as questions read them, so a question neither decrypts the key texts
/// nor hashes them again.
pub const KEY_ID: &str = "__escrow_key_id";
pub const NAME_ID: &str = "__escrow_name_id";
pub const PLACE_ID: &str = "__escrow_place_id";

/// Field metadata of the id columns: the check value of the hash that made them
/// ([`StoredIds::check`]). A reader whose hash has another check value hashes the texts
/// itself.
pub const ID_CHECK: &str = "escrow.id_check";

/// A function from one column to another (key texts into entity ids, say).
pub type ColumnFn = Arc<dyn Fn(&dyn Array) -> crate::Result<ArrayRef> + Send + Sync>;

/// The query engine's entity-id hash, for ids computed at upload: the hash is keyed with a
/// secret of the escrow the store does not hold, and `check` (the hash of a fixed text)
/// tells a reader whether stored ids are the ones its own hash would give.
#[derive(Clone)]
pub struct StoredIds {
    pub hash: ColumnFn,
    pub check: u64,
}

impl std::fmt::Debug for StoredIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoredIds(check {:016x})", self.check)
    }
}

impl PartialEq for StoredIds {
    fn eq(&self, other: &Self) -> bool {
        self.check == other.check
    }
}

impl Eq for StoredIds {}

/// Separates a name from its context values inside a name key.
const CONTEXT_SEPARATOR: char = '\u{1f}';

/// Headers (lowercase, letters and digits only) of place columns, by kind. CRMs export a
/// company's country, state or sales region under these names; a column of the same kind in
/// both lists is compared when a name links two companies.
const PLACE_HEADERS: &[(&str, &[&str])] = &[
    (
        "country",
        &[
            "country",
            "countrycode",
            "countryname",
            "billingcountry",
            "billingcountrycode",
            "shippingcountry",
            "mailingcountry",
            "hqcountry",
            "headquarterscountry",
            "accountcountry",
            "companycountry",
        ],
    ),
    (
        "region",
        &[
            "region",
            "salesregion",
            "georegion",
            "geo",
            "billingregion",
            "hqregion",
        ],
    ),
    (
        "state",
        &[
            "state",
            "stateprovince",
            "province",
            "billingstate",
            "billingstateprovince",
            "shippingstate",
            "hqstate",
        ],
    ),
];

/// The kind of place a column holds, from its header (`Billing Country` -> `country`); for a
/// header not recognised, the header itself (lowercase, letters and digits only).
pub fn place_kind(column: &str) -> String {
    let header: String = column
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    PLACE_HEADERS
        .iter()
        .find(|(_, headers)| headers.contains(&header.as_str()))
        .map_or(header, |(kind, _)| (*kind).to_string())
}

/// Whether a column of this type holds text (a dictionary of text too).
pub fn is_text(t: &DataType) -> bool {
    let t = match t {
        DataType::Dictionary(_, v) => v.as_ref(),
        other => other,
    };
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The place columns detected in an upload's `schema`: per recognised kind, the first text
/// column of that kind (a place is compared as words, never as a number), skipping `except`
/// (the key and name columns). In kind order.
pub fn detect_places(schema: &arrow_schema::Schema, except: &[&str]) -> Vec<String> {
    let columns: Vec<&str> = schema
        .fields()
        .iter()
        .filter(|f| is_text(f.data_type()))
        .map(|f| f.name().as_str())
        .filter(|c| !except.contains(c))
        .collect();
    PLACE_HEADERS
        .iter()
        .filter_map(|(kind, _)| {
            columns
                .iter()
                .find(|c| place_kind(c) == *kind)
                .map(|c| (*c).to_string())
        })
        .collect()
}

/// The value of [`PLACE_KINDS`] for place columns `columns`.
pub fn place_kinds(columns: &[String]) -> String {
    let mut kinds: Vec<String> = columns.iter().map(|c| place_kind(c)).collect();
    kinds.sort();
    kinds.join(",")
}

/// The places of one batch: per row, the normalised values of `columns` (compared like
/// names: case, accents, punctuation and spacing aside) in kind order, separated by U+001F;
/// null where one is missing. Each distinct raw value is normalised once.
pub fn place_keys(columns: &[(&str, &dyn Array)]) -> Result<ArrayRef, ArrowError> {
    let mut ordered: Vec<(String, StringArray)> = columns
        .iter()
        .map(|(c, a)| Ok((place_kind(c), text(*a)?)))
        .collect::<Result<_, ArrowError>>()?;
    ordered.sort_by(|x, y| x.0.cmp(&y.0));
    let rows = ordered.first().map_or(0, |(_, a)| a.len());
    let mut seen: Vec<std::collections::HashMap<&str, Option<String>>> =
        vec![std::collections::HashMap::new(); ordered.len()];
    let mut out = arrow_array::builder::StringBuilder::with_capacity(rows, rows * 8);
    let mut key = String::new();
    'rows: for i in 0..rows {
        key.clear();
        for (j, (_, a)) in ordered.iter().enumerate() {
            let v = a.is_valid(i).then(|| a.value(i)).and_then(|raw| {
                seen[j]
                    .entry(raw)
                    .or_insert_with(|| context_value(raw))
                    .as_deref()
            });
            let Some(v) = v else {
                out.append_null();
                continue 'rows;
            };
            if j > 0 {
                key.push(CONTEXT_SEPARATOR);
            }
            key.push_str(v);
        }
        out.append_value(&key);
    }
    Ok(Arc::new(out.finish()))
}

/// The columns of a sealed schema that users see (all but the hidden `__escrow*` ones):
/// their indices and the declared schema.
pub fn declared_schema(
    sealed: &arrow_schema::SchemaRef,
) -> Result<(Vec<usize>, arrow_schema::SchemaRef), ArrowError> {
    let shown: Vec<usize> = (0..sealed.fields().len())
        .filter(|&i| !sealed.field(i).name().starts_with("__escrow"))
        .collect();
    let declared = Arc::new(sealed.project(&shown)?);
    Ok((shown, declared))
}

/// How many rows of an upload got which kind of key.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct MatchStats {
    /// Keyed by the registrable domain of their website.
    pub by_domain: u64,
    /// Keyed by their normalised name (no usable website).
    pub by_name: u64,
    /// Neither: never joined, never counted as a company.
    pub unmatched: u64,
}

impl std::ops::AddAssign for MatchStats {
    fn add_assign(&mut self, other: Self) {
        self.by_domain += other.by_domain;
        self.by_name += other.by_name;
        self.unmatched += other.unmatched;
    }
}

/// The name side of a batch: the name column and the columns whose values must agree too.
#[derive(Clone, Copy)]
pub struct Names<'a> {
    pub name: &'a dyn Array,
    pub context: &'a [&'a dyn Array],
}

fn text(a: &dyn Array) -> Result<StringArray, ArrowError> {
    let t = arrow_cast::cast(a, &DataType::Utf8)?;
    t.as_any()
        .downcast_ref::<StringArray>()
        .cloned()
        .ok_or_else(|| ArrowError::CastError("not text".into()))
}

/// Company keys of one batch: `website` (and `names`, if given) -> a Utf8 column of
/// `d:`/`n:` keys, null where the row is unmatched, and (with `names`) the Utf8 column of
/// name keys.
pub fn company_keys(
    website: &dyn Array,
    names: Option<Names<'_>>,
    stats: &mut MatchStats,
) -> Result<(ArrayRef, Option<ArrayRef>), ArrowError> {
    let websites = text(website)?;
    let (name_text, context) = match names {
        Some(n) => (
            Some(text(n.name)?),
            n.context
                .iter()
                .map(|c| text(*c))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => (None, Vec::new()),
    };
    fn value(a: &StringArray, i: usize) -> Option<&str> {
        a.is_valid(i).then(|| a.value(i))
    }
    let mut scratch: Vec<Option<&str>> = Vec::with_capacity(context.len());
    let mut keys = Vec::with_capacity(websites.len());
    let mut name_keys = Vec::with_capacity(if names.is_some() { websites.len() } else { 0 });
    for i in 0..websites.len() {
        let name = name_text.as_ref().and_then(|n| {
            scratch.clear();
            scratch.extend(context.iter().map(|c| value(c, i)));
            name_identity(value(n, i), &scratch)
        });
        let key = match value(&websites, i).and_then(website_key) {
            Some(d) => {
                stats.by_domain += 1;
                Some(format!("d:{d}"))
            }
            None if name.is_some() => {
                stats.by_name += 1;
                name.clone()
            }
            None => {
                stats.unmatched += 1;
                None
            }
        };
        keys.push(key);
        if names.is_some() {
            name_keys.push(name);
        }
    }
    let keys: ArrayRef = Arc::new(StringArray::from(keys));
    let name_keys = names
        .is_some()
        .then(|| Arc::new(StringArray::from(name_keys)) as ArrayRef);
    Ok((keys, name_keys))
}

/// Rows of a batch below which its keys are computed on one thread.
const PARALLEL_ROWS: usize = 8192;

/// Helper threads computing keys, in the whole process: at most one fewer than the cores.
static HELPERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Up to `wanted` helper threads, as many as are free; given back on drop.
struct Helpers(usize);

impl Helpers {
    fn take(wanted: usize) -> Helpers {
        use std::sync::atomic::Ordering;
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores =
            *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let most = cores.saturating_sub(1);
        let mut got = 0;
        let _ = HELPERS.fetch_update(Ordering::AcqRel, Ordering::Acquire, |busy| {
            got = wanted.min(most.saturating_sub(busy));
            Some(busy + got)
        });
        Helpers(got)
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        HELPERS.fetch_sub(self.0, std::sync::atomic::Ordering::AcqRel);
    }
}

/// [`company_keys`] of a large batch in slices on the calling thread and up to 3 helpers
/// (one fewer than the cores in the whole process, whatever the number of uploads): URL,
/// public-suffix and name normalisation are most of an upload's work.
pub fn company_keys_parallel(
    website: &dyn Array,
    names: Option<Names<'_>>,
    stats: &mut MatchStats,
) -> Result<(ArrayRef, Option<ArrayRef>), ArrowError> {
    let rows = website.len();
    let helpers = Helpers::take((rows / PARALLEL_ROWS).min(4).saturating_sub(1));
    let threads = 1 + helpers.0;
    if threads < 2 {
        return company_keys(website, names, stats);
    }
    let chunk = rows.div_ceil(threads);
    type Part = Result<(ArrayRef, Option<ArrayRef>, MatchStats), ArrowError>;
    // Slice t of the batch.
    let part = |t: usize| -> Part {
        let (offset, len) = (t * chunk, chunk.min(rows - t * chunk));
        let website = website.slice(offset, len);
        let name = names.map(|n| n.name.slice(offset, len));
        let context: Vec<ArrayRef> = names
            .map(|n| n.context.iter().map(|c| c.slice(offset, len)).collect())
            .unwrap_or_default();
        let context: Vec<&dyn Array> = context.iter().map(|c| c.as_ref()).collect();
        let names = name.as_ref().map(|n| Names {
            name: n.as_ref(),
            context: &context,
        });
        let mut stats = MatchStats::default();
        let (keys, name_keys) = company_keys(website.as_ref(), names, &mut stats)?;
        Ok((keys, name_keys, stats))
    };
    let parts: Vec<Part> = std::thread::scope(|s| {
        let part = &part;
        let handles: Vec<_> = (1..threads).map(|t| s.spawn(move || part(t))).collect();
        let first = part(0);
        std::iter::once(first)
            .chain(
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
            )
            .collect()
    });
    drop(helpers);
    let mut keys = Vec::with_capacity(threads);
    let mut name_keys = Vec::with_capacity(threads);
    for part in parts {
        let (k, n, s) = part?;
        *stats += s;
        keys.push(k);
        name_keys.extend(n);
    }
    let concat = |parts: &[ArrayRef]| {
        let refs: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
        arrow_select::concat::concat(&refs)
    };
    let name_keys = match names {
        Some(_) => Some(concat(&name_keys)?),
        None => None,
    };
    Ok((concat(&keys)?, name_keys))
}

/// A canonical company key (`d:domain` or `n:name`).
pub fn company_key(website: Option<&str>, name: Option<&str>) -> Option<String> {
    if let Some(d) = website.and_then(website_key) {
        return Some(format!("d:{d}"));
    }
    name_identity(name, &[])
}

/// The name key of a row: `n:` + its normalised name, then each context value normalised
/// (case, accents, punctuation and spacing as for names), separated by U+001F. `None` when
/// the name normalises to nothing or a context value is missing (such a row has no name to
/// match by).
pub fn name_identity(name: Option<&str>, context: &[Option<&str>]) -> Option<String> {
    let mut key = format!("n:{}", name.and_then(name_key)?);
    for c in context {
        let v = context_value((*c)?)?;
        key.push(CONTEXT_SEPARATOR);
        key.push_str(&v);
    }
    Some(key)
}

/// Values that mean "not known" in a context column. Not `na`: that is North America.
const CONTEXT_PLACEHOLDERS: &[&str] = &[
    "-", "--", "n/a", "none", "null", "nil", "unknown", "tbd", "?",
];

/// A context value (a country, a region, a city): compared without case, accents,
/// punctuation or extra spacing. Empty values and placeholders count as missing.
fn context_value(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if CONTEXT_PLACEHOLDERS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(raw))
    {
        return None;
    }
    let words = fold_text(raw);
    let v = words.split_whitespace().collect::<Vec<_>>().join(" ");
    (!v.is_empty()).then_some(v)
}

/// Registrable domains that many unrelated companies share: a website (or e-mail) there
/// names no company. Not exhaustive; see docs/MATCHING.md.
const SHARED_DOMAINS: &[&str] = &[
    // free mail
    "gmail.com",
    "googlemail.com",
    "yahoo.com",
    "yahoo.co.uk",
    "yahoo.co.jp",
    "yahoo.fr",
    "ymail.com",
    "hotmail.com",
    "hotmail.co.uk",
    "hotmail.fr",
    "outlook.com",
    "live.com",
    "msn.com",
    "aol.com",
    "icloud.com",
    "me.com",
    "mac.com",
    "proton.me",
    "protonmail.com",
    "gmx.de",
    "gmx.net",
    "gmx.com",
    "web.de",
    "mail.ru",
    "yandex.ru",
    "yandex.com",
    "qq.com",
    "163.com",
    "126.com",
    "naver.com",
    "orange.fr",
    "free.fr",
    "t-online.de",
    "libero.it",
    "zoho.com",
    "fastmail.com",
    // social networks, marketplaces, link and site-builder hosts
    "linkedin.com",
    "facebook.com",
    "instagram.com",
    "twitter.com",
    "x.com",
    "youtube.com",
    "tiktok.com",
    "google.com",
    "goo.gl",
    "bit.ly",
    "linktr.ee",
    "wixsite.com",
    "wix.com",
    "squarespace.com",
    "godaddysites.com",
    "weebly.com",
    "wordpress.com",
    "blogspot.com",
    "sites.google.com",
    "amazon.com",
    "ebay.com",
    "etsy.com",
    "yelp.com",
    "crunchbase.com",
    "example.com",
];

/// Values CRM exports use for "no website".
const PLACEHOLDERS: &[&str] = &[
    "", "-", "--", "n/a", "n a", "na", "none", "null", "nil", "unknown", "tbd", "?", "0",
];

/// The registrable domain of a website (or e-mail address), if it names a company.
pub fn website_key(raw: &str) -> Option<String> {
    let v = raw
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '<' || c == '>');
    if PLACEHOLDERS.iter().any(|p| p.eq_ignore_ascii_case(v)) || v.chars().any(char::is_whitespace)
    {
        return None;
    }
    let v = v.strip_prefix("mailto:").unwrap_or(v);
    // An e-mail address (no scheme): its domain.
    let v = match (v.contains("://"), v.rsplit_once('@')) {
        (false, Some((_, domain))) => domain,
        _ => v,
    };
    let with_scheme: Cow<'_, str> = if v.contains("://") {
        Cow::Borrowed(v)
    } else if let Some(rest) = v.strip_prefix("//") {
        Cow::Owned(format!("http://{rest}"))
    } else {
        Cow::Owned(format!("http://{v}"))
    };
    let url = url::Url::parse(&with_scheme).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let url::Host::Domain(host) = url.host()? else {
        return None; // an IP address names a machine, not a company
    };
    let host = host.trim_end_matches('.');
    if !host.contains('.') || host.split('.').any(str::is_empty) {
        return None;
    }
    let domain = psl::domain_str(host)?;
    if SHARED_DOMAINS.contains(&domain) {
        return None;
    }
    Some(domain.to_string())
}

/// Legal forms dropped from the end of a name (after dots are removed: `S.A.` is `sa`).
const LEGAL_FORMS: &[&str] = &[
    "inc",
    "incorporated",
    "llc",
    "llp",
    "lp",
    "ltd",
    "limited",
    "corp",
    "corporation",
    "co",
    "company",
    "plc",
    "gmbh",
    "ag",
    "kg",
    "ug",
    "sa",
    "sas",
    "sarl",
    "srl",
    "spa",
    "bv",
    "nv",
    "ab",
    "as",
    "asa",
    "oy",
    "oyj",
    "kk",
    "pty",
    "pte",
    "pvt",
    "sl",
    "se",
];

/// Lowercase, accents dropped, `&`/`+` read as `and`, dots and apostrophes joining their
/// letters (`S.A.` -> `sa`), every other non-alphanumeric character a space.
fn fold_text(raw: &str) -> String {
    let mut text = String::with_capacity(raw.len());
    for c in raw.nfkd() {
        if is_combining_mark(c) || c == '.' || c == '\'' || c == '’' {
            continue;
        }
        if c == '&' || c == '+' {
            text.push_str(" and ");
        } else if c.is_alphanumeric() {
            text.extend(c.to_lowercase());
        } else {
            text.push(' ');
        }
    }
    text
}

/// The normalised company name, if anything is left of it.
pub fn name_key(raw: &str) -> Option<String> {
    let text = fold_text(raw);
    let mut words: Vec<&str> = text.split_whitespace().collect();
    if words.len() > 1 && words[0] == "the" {
        words.remove(0);
    }
    while words.len() > 1 && words.last().is_some_and(|w| LEGAL_FORMS.contains(w)) {
        words.pop();
    }
    let key = words.join(" ");
    (!key.is_empty() && !PLACEHOLDERS.contains(&key.as_str())).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decorations a CRM export puts around a website, each of which must not change the key.
    fn decorate(domain: &str) -> Vec<String> {
        let mut out = Vec::new();
        for scheme in ["", "http://", "https://", "HTTPS://", "//"] {
            for host in [
                domain.to_string(),
                format!("www.{domain}"),
                format!("WWW.{}", domain.to_uppercase()),
                format!("shop.{domain}"),
                format!("eu.app.{domain}"),
            ] {
                for tail in ["", "/", "/about", ":8443/en-us/?utm_source=crm#top", "."] {
                    let host = if tail == "." {
                        format!("{host}.")
                    } else {
                        host.clone()
                    };
                    let tail = if tail == "." { "" } else { tail };
                    out.push(format!("{scheme}{host}{tail}"));
                    out.push(format!("  {scheme}{host}{tail} "));
                }
            }
        }
        out
    }

    #[test]
    fn decorated_websites_reduce_to_their_registrable_domain() {
        let domains = [
            "acme.com",
            "acme.co.uk",
            "acme.com.au",
            "acme.co.jp",
            "acme.com.br",
            "acme.de",
            "acme.io",
            "acme-systems.ai",
            "acme.github.io",
            "xn--bcher-kva.de",
        ];
        let mut checked = 0;
        for d in domains {
            for v in decorate(d) {
                assert_eq!(website_key(&v).as_deref(), Some(d), "{v:?}");
                checked += 1;
            }
        }
        assert!(checked >= 1000, "{checked}");
    }

    #[test]
    fn website_shapes() {
        let cases: &[(&str, Option<&str>)] = &[
            ("shop.acme.co.uk", Some("acme.co.uk")),
            ("https://WWW.ACME.CO.UK/about", Some("acme.co.uk")),
            ("acme.co.uk.", Some("acme.co.uk")),
            ("http://user:pw@acme.com:8080/x", Some("acme.com")),
            ("sales@acme.com", Some("acme.com")),
            ("mailto:Sales@ACME.com", Some("acme.com")),
            ("<https://acme.com>", Some("acme.com")),
            ("\"acme.com\"", Some("acme.com")),
            ("a.b.c.acme.com.au", Some("acme.com.au")),
            ("acme.k12.ca.us", Some("acme.k12.ca.us")), // k12.ca.us is a public suffix
            ("k12.ca.us", None),
            ("school.acme.k12.ca.us", Some("acme.k12.ca.us")),
            ("city.kawasaki.jp", Some("city.kawasaki.jp")), // an exception rule
            ("www.city.kawasaki.jp", Some("city.kawasaki.jp")),
            ("foo.bar.kawasaki.jp", Some("foo.bar.kawasaki.jp")), // a wildcard rule
            // IDNA: Unicode and punycode spellings are one company
            ("https://Bücher.de/kontakt", Some("xn--bcher-kva.de")),
            ("BÜCHER.DE", Some("xn--bcher-kva.de")),
            ("www.münchen.de", Some("xn--mnchen-3ya.de")),
            ("例子.中国", Some("xn--fsqu00a.xn--fiqs8s")),
            ("https://www.例子.中国/", Some("xn--fsqu00a.xn--fiqs8s")),
            ("пример.рф", Some("xn--e1afmkfd.xn--p1ai")),
            // unknown TLDs fall back to the last label as the suffix
            ("acme.zzz", Some("acme.zzz")),
            // shared domains name nobody
            ("gmail.com", None),
            ("https://www.linkedin.com/company/acme", None),
            ("jane.doe@gmail.com", None),
            ("JOHN@HOTMAIL.CO.UK", None),
            // not a company website
            ("", None),
            ("   ", None),
            ("n/a", None),
            ("N/A", None),
            ("none", None),
            ("-", None),
            ("localhost", None),
            ("http://10.0.0.1/", None),
            ("http://[::1]/", None),
            ("co.uk", None),
            ("com", None),
            ("acme", None),
            ("not a url", None),
            ("ftp://acme.com", None),
            ("javascript:alert(1)", None),
            ("http://", None),
            ("http://acme..com", None),
        ];
        for (raw, want) in cases {
            assert_eq!(website_key(raw).as_deref(), *want, "{raw:?}");
        }
    }

    #[test]
    fn name_shapes() {
        let cases: &[(&str, Option<&str>)] = &[
            ("Acme Systems", Some("acme systems")),
            ("ACME SYSTEMS, INC.", Some("acme systems")),
            ("acme systems inc", Some("acme systems")),
            ("  Acme   Systems  ", Some("acme systems")),
            ("The Acme Systems LLC", Some("acme systems")),
            ("Acme Systems Ltd.", Some("acme systems")),
            ("Acme Systems Limited", Some("acme systems")),
            ("Acme Systems GmbH", Some("acme systems")),
            ("Acme Systems S.A.", Some("acme systems")),
            ("Acme Systems B.V.", Some("acme systems")),
            ("Acme Systems Corp.", Some("acme systems")),
            ("Acme Systems Corporation", Some("acme systems")),
            ("Acme Systems Co.", Some("acme systems")),
            ("Acme Systems PLC", Some("acme systems")),
            ("Acme Systems Pty Ltd", Some("acme systems")),
            ("Acme Holdings AG", Some("acme holdings")), // "Holdings" is part of names
            ("Müller & Söhne GmbH", Some("muller and sohne")),
            ("MÜLLER + SÖHNE", Some("muller and sohne")),
            ("Ｆｕｌｌｗｉｄｔｈ Ｃｏｒｐ", Some("fullwidth")), // NFKD folds compatibility forms
            ("Café Noir", Some("cafe noir")),
            ("Café Noir S.à r.l.", Some("cafe noir sa rl")), // not a listed legal form
            ("O'Reilly Media", Some("oreilly media")),
            ("AT&T", Some("at and t")),
            ("株式会社 トヨタ", Some("株式会社 トヨタ")),
            // a legal form alone is a name, not nothing
            ("Company", Some("company")),
            ("The", Some("the")),
            ("", None),
            ("  ", None),
            ("N/A", None),
            ("---", None),
        ];
        for (raw, want) in cases {
            assert_eq!(name_key(raw).as_deref(), *want, "{raw:?}");
        }
    }

    /// The messy spellings CRM exports make of one name (case, legal form, "The", spacing),
    /// each of which must reduce to the same key.
    #[test]
    fn decorated_names_reduce_to_one_key() {
        let names = [
            ("Novaterra Systems", "novaterra systems"),
            ("Acme Labs", "acme labs"),
            ("Globex", "globex"),
            ("Initech Health Group", "initech health group"),
            ("Zenbit Cloud", "zenbit cloud"),
        ];
        let forms = [
            "",
            " Inc",
            " Inc.",
            ", Inc.",
            " LLC",
            ", LLC",
            " Ltd",
            " Ltd.",
            " Limited",
            " GmbH",
            " AG",
            " S.A.",
            " Corp",
            " Corp.",
            " Corporation",
            " Co.",
            " PLC",
            " BV",
        ];
        let mut checked = 0;
        for (name, want) in names {
            for form in forms {
                for cased in [name.to_string(), name.to_uppercase(), name.to_lowercase()] {
                    for the in ["", "The "] {
                        let v = format!("{the}{cased}{form}");
                        let spaced = format!("  {} ", v.replace(' ', "  "));
                        for v in [v, spaced] {
                            assert_eq!(name_key(&v).as_deref(), Some(want), "{v:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked >= 1000, "{checked}");
    }

    #[test]
    fn website_first_then_name_then_unmatched() {
        assert_eq!(
            company_key(Some("https://www.acme.com/"), Some("Acme Inc")).as_deref(),
            Some("d:acme.com")
        );
        assert_eq!(
            company_key(Some("jane@gmail.com"), Some("Acme Inc")).as_deref(),
            Some("n:acme")
        );
        assert_eq!(
            company_key(None, Some("Acme, Inc.")).as_deref(),
            Some("n:acme")
        );
        assert_eq!(company_key(Some("n/a"), None), None);
        assert_eq!(company_key(None, Some("  ")), None);
        // A domain key never equals a name key, even for the same text.
        assert_ne!(
            company_key(Some("acme.com"), None),
            company_key(None, Some("acme.com"))
        );
    }

    #[test]
    fn name_keys_carry_their_context_and_every_named_row_has_one() {
        assert_eq!(
            name_identity(Some("Acme, Inc."), &[Some(" EMEA "), Some("Deutschland")]).as_deref(),
            Some("n:acme\u{1f}emea\u{1f}deutschland")
        );
        // Context compares like names: case, accents, punctuation and spacing aside.
        assert_eq!(
            name_identity(Some("ACME"), &[Some("Côte d'Ivoire")]),
            name_identity(Some("acme inc"), &[Some("cote  divoire")])
        );
        assert_ne!(
            name_identity(Some("Acme"), &[Some("EMEA")]),
            name_identity(Some("Acme"), &[Some("APAC")])
        );
        // A missing context value leaves the row without a name to match by.
        assert_eq!(name_identity(Some("Acme"), &[None]), None);
        assert_eq!(name_identity(Some("Acme"), &[Some("n/a")]), None);
        assert_eq!(name_identity(Some("Acme"), &[Some(" ")]), None);
        // `NA` is a region (North America), not a placeholder.
        assert_eq!(
            name_identity(Some("Acme"), &[Some("NA")]).as_deref(),
            Some("n:acme\u{1f}na")
        );
        assert_eq!(name_identity(None, &[Some("EMEA")]), None);

        let websites = StringArray::from(vec![
            Some("acme.com"),
            None,
            Some("gmail.com"),
            None,
            Some("globex.io"),
        ]);
        let names = StringArray::from(vec![
            Some("Acme Inc"),
            Some("Acme"),
            Some("Initech LLC"),
            None,
            Some("Globex"),
        ]);
        let region = StringArray::from(vec![
            Some("EMEA"),
            Some("emea"),
            Some("NA"),
            Some("NA"),
            None,
        ]);
        let mut stats = MatchStats::default();
        let context: [&dyn Array; 1] = [&region];
        let (keys, name_keys) = company_keys(
            &websites,
            Some(Names {
                name: &names,
                context: &context,
            }),
            &mut stats,
        )
        .expect("keys");
        let strings = |a: &ArrayRef| -> Vec<Option<String>> {
            let a = a.as_any().downcast_ref::<StringArray>().expect("text");
            a.iter().map(|v| v.map(str::to_string)).collect()
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            strings(&keys),
            vec![
                s("d:acme.com"),
                s("n:acme\u{1f}emea"), // no website: its name key is its company key
                s("n:initech\u{1f}na"),
                None,
                s("d:globex.io"),
            ]
        );
        assert_eq!(
            strings(&name_keys.expect("name keys")),
            vec![
                s("n:acme\u{1f}emea"), // the website row names the same company
                s("n:acme\u{1f}emea"),
                s("n:initech\u{1f}na"),
                None,
                None, // no region: no name to match by
            ]
        );
        assert_eq!(
            stats,
            MatchStats {
                by_domain: 2,
                by_name: 2,
                unmatched: 1
            }
        );
        // Without a name column there are no name keys.
        let (_, none) = company_keys(&websites, None, &mut stats).expect("keys");
        assert!(none.is_none());
    }

    #[test]
    fn place_columns_are_known_by_their_headers() {
        assert_eq!(place_kind("Billing Country"), "country");
        assert_eq!(place_kind("billing_country_code"), "country");
        assert_eq!(place_kind("State/Province"), "state");
        assert_eq!(place_kind("GEO"), "region");
        assert_eq!(place_kind("Sales Territory"), "salesterritory");
        let schema = |columns: &[(&str, DataType)]| {
            arrow_schema::Schema::new(
                columns
                    .iter()
                    .map(|(c, t)| arrow_schema::Field::new(*c, t.clone(), true))
                    .collect::<Vec<_>>(),
            )
        };
        let columns = schema(&[
            ("website", DataType::Utf8),
            ("company_name", DataType::Utf8),
            ("city", DataType::Utf8),
            ("state", DataType::Int64),
            ("Region", DataType::Utf8),
            ("country", DataType::LargeUtf8),
            ("Billing Country", DataType::Utf8),
        ]);
        // One text column per kind, the first; the key and name columns are never places.
        assert_eq!(
            detect_places(&columns, &["website", "company_name"]),
            ["country", "Region"]
        );
        let region_key = schema(&[("region", DataType::Utf8), ("website", DataType::Utf8)]);
        assert_eq!(
            detect_places(&region_key, &["region"]),
            Vec::<String>::new()
        );
        assert_eq!(
            place_kinds(&["Region".into(), "Country".into()]),
            "country,region"
        );
        // Values in kind order whatever the column order, compared like names.
        let region = StringArray::from(vec![Some(" EMEA"), Some("apac"), None]);
        let country = StringArray::from(vec![Some("Côte d'Ivoire"), Some("n/a"), Some("FR")]);
        let keys = place_keys(&[("region", &region), ("country", &country)]).expect("places");
        let keys = keys.as_any().downcast_ref::<StringArray>().expect("text");
        assert_eq!(
            keys.iter().collect::<Vec<_>>(),
            [Some("cote divoire\u{1f}emea"), None, None]
        );
    }

    #[test]
    fn keys_in_parallel_are_the_keys_in_one_piece() {
        let n = 3 * PARALLEL_ROWS + 17;
        let websites = StringArray::from_iter((0..n).map(|i| match i % 5 {
            0 => None,
            1 => Some(format!("https://www.c{i}.co.uk/about")),
            2 => Some("gmail.com".to_string()),
            _ => Some(format!("c{}.example", i % 977)),
        }));
        let names = StringArray::from_iter(
            (0..n).map(|i| (i % 7 != 0).then(|| format!("C{} Inc", i % 991))),
        );
        let region = StringArray::from_iter((0..n).map(|i| (i % 11 != 0).then_some("EMEA")));
        let context: [&dyn Array; 1] = [&region];
        let names = Names {
            name: &names,
            context: &context,
        };
        let (mut one, mut many) = (MatchStats::default(), MatchStats::default());
        let whole = company_keys(&websites, Some(names), &mut one).expect("keys");
        let parts = company_keys_parallel(&websites, Some(names), &mut many).expect("keys");
        assert_eq!(one, many);
        assert_eq!(whole.0.to_data(), parts.0.to_data());
        assert_eq!(
            whole.1.expect("names").to_data(),
            parts.1.expect("names").to_data()
        );
        let (_, none) = company_keys_parallel(&websites, None, &mut many).expect("keys");
        assert!(none.is_none());
    }
}
