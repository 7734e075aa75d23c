//! moas-sys declares every constant of include/moas.h with the header's value. The header
//! is read at test time, so a constant missing here, one the header lacks, or a wrong
//! value fails. The statuses (MOAS_OK, MOAS_ERR_*, MOAS_STATUS_COUNT) come from the
//! header's X-macro table and are checked against its rows apart.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// (name, value) of each constant given, its name spelled once.
macro_rules! constants {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), i64::from(moas_sys::$name))),*]
    };
}

/// Every integer constant of moas-sys but the statuses.
fn declared() -> Vec<(&'static str, i64)> {
    constants![
        MOAS_VERSION_MAJOR,
        MOAS_VERSION_MINOR,
        MOAS_VERSION_PATCH,
        MOAS_VERSION_NUMBER,
        MOAS_LOG_ERROR,
        MOAS_LOG_WARN,
        MOAS_LOG_INFO,
        MOAS_LOG_DEBUG,
        MOAS_LOG_LEVEL_COUNT,
        MOAS_TYPE_F32,
        MOAS_TYPE_F16,
        MOAS_TYPE_Q8_0,
        MOAS_TYPE_BF16,
        MOAS_MIXING_SINGLE,
        MOAS_MIXING_MEAN,
        MOAS_MIXING_ROUTER,
        MOAS_MIXING_COUNT,
        MOAS_KV_SHARING_INDEPENDENT,
        MOAS_KV_SHARING_POOLED,
        MOAS_KV_SHARING_COUNT,
        MOAS_META_UINT8,
        MOAS_META_INT8,
        MOAS_META_UINT16,
        MOAS_META_INT16,
        MOAS_META_UINT32,
        MOAS_META_INT32,
        MOAS_META_FLOAT32,
        MOAS_META_BOOL,
        MOAS_META_STRING,
        MOAS_META_ARRAY,
        MOAS_META_UINT64,
        MOAS_META_INT64,
        MOAS_META_FLOAT64,
        MOAS_META_TYPE_COUNT,
        MOAS_MODE_MIXTURE,
        MOAS_MODE_ROUTED,
        MOAS_MODE_COUNT,
        MOAS_KERNELS_AUTO,
        MOAS_KERNELS_REF,
        MOAS_KERNELS_COUNT,
        MOAS_LOGITS_NONE,
        MOAS_LOGITS_LAST,
        MOAS_LOGITS_ALL,
        MOAS_LOGITS_COUNT,
        MOAS_UNKNOWN_ERROR,
        MOAS_UNKNOWN_REPLACE,
        MOAS_UNKNOWN_DROP,
        MOAS_UNKNOWN_COUNT,
    ]
}

fn is_status(name: &str) -> bool {
    name == "MOAS_OK" || name.starts_with("MOAS_ERR_") || name == "MOAS_STATUS_COUNT"
}

/// A file of this source tree, from this crate's directory.
fn tree_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// `text` without its /* */ comments and with continued lines joined.
fn plain(text: &str) -> String {
    let joined = text.replace("\\\n", " ");
    let mut out = String::new();
    let mut rest = joined.as_str();
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("an unterminated comment") + start + 2;
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn identifier(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    text.split_at(end)
}

/// The header's constants: its object-like `#define MOAS_...` and the enumerators of its
/// enums (an enumerator without a value is one more than the one before), statuses
/// aside; integers, and strings with their quotes. A constant it cannot read fails,
/// so that a new kind is not skipped unseen.
fn header_constants(header: &str) -> (BTreeMap<String, i64>, BTreeMap<String, String>) {
    let text = plain(header);
    let (mut ints, mut strings) = (BTreeMap::new(), BTreeMap::new());

    for line in text.lines() {
        let directive = match line.trim_start().strip_prefix('#') {
            Some(d) => d.trim_start(),
            None => continue,
        };
        let (name, value) = match directive.strip_prefix("define") {
            Some(rest) => identifier(rest.trim_start()),
            None => continue,
        };
        // function-like macros, the include guard and the export attribute are no constants
        if !name.starts_with("MOAS_")
            || value.starts_with('(')
            || name == "MOAS_H"
            || name == "MOAS_API"
        {
            continue;
        }
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Ok(v) = value.parse::<i64>() {
            ints.insert(name.to_string(), v);
        } else if value.starts_with('"') {
            strings.insert(name.to_string(), value);
        } else if name == "MOAS_VERSION_NUMBER" {
            assert_eq!(
                value,
                "(MOAS_VERSION_MAJOR * 10000 + MOAS_VERSION_MINOR * 100 + MOAS_VERSION_PATCH)"
            );
            let part = |p: &str| ints[&format!("MOAS_VERSION_{p}")];
            let number = part("MAJOR") * 10000 + part("MINOR") * 100 + part("PATCH");
            ints.insert(name.to_string(), number);
        } else {
            panic!("#define {name} {value}: not a constant this test can read");
        }
    }

    let mut rest = text.as_str();
    while let Some(at) = rest.find("typedef enum ") {
        let (enum_name, after) = identifier(&rest[at + "typedef enum ".len()..]);
        let open = after.find('{').expect("an enum body");
        let close = after.find('}').expect("the end of an enum body");
        let body = &after[open + 1..close];
        rest = &after[close..];
        if enum_name == "moas_status" {
            continue;
        }
        let mut next = 0i64;
        for item in body.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = identifier(item);
            let value = value.trim();
            let v = match value.strip_prefix('=') {
                Some(v) => v
                    .trim()
                    .parse::<i64>()
                    .unwrap_or_else(|_| panic!("{enum_name}: cannot read {item}")),
                None if value.is_empty() => next,
                None => panic!("{enum_name}: cannot read {item}"),
            };
            assert!(name.starts_with("MOAS_"), "{enum_name}: {item}");
            ints.insert(name.to_string(), v);
            next = v + 1;
        }
    }
    (ints, strings)
}

#[test]
fn every_constant_of_the_header_with_its_value() {
    let (header, strings) = header_constants(&tree_file("../../../include/moas.h"));
    let header: BTreeMap<String, i64> = header
        .into_iter()
        .filter(|(name, _)| !is_status(name))
        .collect();
    // the parser sees what it should: a few the header is known to have
    for (name, value) in [
        ("MOAS_TYPE_BF16", 30),
        ("MOAS_META_FLOAT64", 12),
        ("MOAS_META_TYPE_COUNT", 13),
        ("MOAS_VERSION_MAJOR", 1),
    ] {
        assert_eq!(header.get(name), Some(&value), "{name}");
    }

    let declared: BTreeMap<String, i64> = declared()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let missing: Vec<&String> = header
        .keys()
        .filter(|n| !declared.contains_key(*n))
        .collect();
    let unknown: Vec<&String> = declared
        .keys()
        .filter(|n| !header.contains_key(*n))
        .collect();
    let wrong: Vec<String> = declared
        .iter()
        .filter_map(|(n, v)| {
            let h = header.get(n)?;
            (h != v).then(|| format!("{n} is {v}, the header says {h}"))
        })
        .collect();
    assert!(missing.is_empty(), "not in moas-sys: {missing:?}");
    assert!(unknown.is_empty(), "not in moas.h: {unknown:?}");
    assert!(wrong.is_empty(), "{wrong:?}");

    let quoted = format!("{:?}", moas_sys::MOAS_VERSION_STRING);
    assert_eq!(
        strings,
        BTreeMap::from([("MOAS_VERSION_STRING".to_string(), quoted)])
    );
}

#[test]
fn every_constant_moas_sys_declares_is_checked() {
    // each `pub const MOAS_` of src/lib.rs is in the table above (statuses aside, and the
    // version string, which the test above compares itself)
    let lib = tree_file("src/lib.rs");
    let in_lib: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub const "))
        .map(|rest| identifier(rest).0)
        .filter(|n| n.starts_with("MOAS_") && !is_status(n) && *n != "MOAS_VERSION_STRING")
        .collect();
    let checked: BTreeSet<&str> = declared().into_iter().map(|(name, _)| name).collect();
    let unchecked: Vec<&&str> = in_lib.difference(&checked).collect();
    assert!(
        unchecked.is_empty(),
        "not in this test's table: {unchecked:?}"
    );
    // (a name in the table but not in src/lib.rs does not compile)
}

/// The rows of the header's status table, `X(NAME, value, "message")`, as MOAS_NAME.
fn header_statuses(header: &str) -> BTreeMap<String, i64> {
    header
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("X("))
        .map(|row| {
            let mut fields = row.splitn(3, ',');
            let name = fields.next().expect("a name").trim();
            let value = fields.next().expect("a value").trim();
            let value = value
                .parse::<i64>()
                .unwrap_or_else(|_| panic!("status {name}: cannot read {value}"));
            (format!("MOAS_{name}"), value)
        })
        .collect()
}

#[test]
fn every_status_of_the_header_with_its_value() {
    let header = header_statuses(&tree_file("../../../include/moas.h"));
    let declared: BTreeMap<String, i64> = constants![
        MOAS_OK,
        MOAS_ERR_INVALID_ARG,
        MOAS_ERR_NO_MEMORY,
        MOAS_ERR_IO,
        MOAS_ERR_BAD_FORMAT,
        MOAS_ERR_CORRUPT,
        MOAS_ERR_UNSUPPORTED,
        MOAS_ERR_CONTEXT_FULL,
        MOAS_ERR_UNKNOWN_CHAR,
        MOAS_ERR_BUFFER_TOO_SMALL,
        MOAS_ERR_NOT_FOUND,
        MOAS_ERR_WRONG_TYPE,
        MOAS_ERR_INTERNAL,
        MOAS_ERR_INVALID_UTF8,
        MOAS_ERR_POOL_FULL,
        MOAS_ERR_BUSY,
        MOAS_ERR_ABORTED,
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect();
    assert_eq!(header, declared);
    assert_eq!(header.len() as i64, i64::from(moas_sys::MOAS_STATUS_COUNT));
    // the linked library names each of them as the header spells it
    for (name, value) in &header {
        let status = i32::try_from(*value).expect("a status fits an i32");
        let named = unsafe { std::ffi::CStr::from_ptr(moas_sys::moas_status_name(status)) };
        assert_eq!(named.to_str(), Ok(name.as_str()));
    }
}
