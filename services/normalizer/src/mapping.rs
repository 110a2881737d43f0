//! From a raw record to a normalized one: where each field is (a path into the `jsonb`), and
//! what makes it valid. Every rejection names the field and says why.

use etl_shared::sources::{Source, SourceKind};

/// Longest accepted `name`, in characters.
pub const MAX_NAME_CHARS: usize = 1_000;
/// Longest accepted `description`, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
/// Longest `value` text read as a number, in characters (longer ones are refused unread).
pub const MAX_VALUE_CHARS: usize = 1_000;

/// Paths (for Postgres's `#>` operator) of the mapped fields of one source.
#[derive(Debug, Clone)]
pub struct FieldPaths {
    pub name: Vec<String>,
    pub value: Vec<String>,
    pub description: Option<Vec<String>>,
    /// Shown in messages: the mapping as written (`/price`, `price`).
    pub labels: [String; 3],
}

impl FieldPaths {
    pub fn for_source(source: &Source) -> Self {
        let path = |target: &str| match source.kind {
            SourceKind::Rest => pointer_to_path(target),
            SourceKind::Csv => vec![target.to_owned()],
        };
        let m = &source.mapping;
        Self {
            name: path(&m.name),
            value: path(&m.value),
            description: m.description.as_deref().map(path),
            labels: [
                m.name.clone(),
                m.value.clone(),
                m.description.clone().unwrap_or_default(),
            ],
        }
    }
}

impl FieldPaths {
    /// The mapping's canonical text: what `etl_checkpoint.mapping_fingerprint` holds, so a
    /// changed mapping is seen as one (and a reformatted sources file is not).
    pub fn fingerprint(&self) -> String {
        serde_json::json!({
            "name": self.name,
            "value": self.value,
            "description": self.description,
        })
        .to_string()
    }
}

/// RFC 6901 pointer to path tokens: `/a/b~1c` → `["a", "b/c"]`.
pub fn pointer_to_path(pointer: &str) -> Vec<String> {
    pointer
        .strip_prefix('/')
        .unwrap_or(pointer)
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// One mapped field as Postgres read it: `jsonb_typeof` (`None`: nothing there), the `#>>`
/// text (cut by Postgres just past the field's limit, so a huge one never arrives whole), and
/// the whole text's length in characters and bytes.
#[derive(Debug, Clone, Default)]
pub struct Field {
    pub kind: Option<String>,
    pub text: Option<String>,
    pub chars: usize,
    pub bytes: usize,
}

impl Field {
    /// A field whose text arrived whole.
    pub fn new(kind: Option<String>, text: Option<String>) -> Self {
        let (chars, bytes) = text
            .as_deref()
            .map_or((0, 0), |t| (t.chars().count(), t.len()));
        Self {
            kind,
            text,
            chars,
            bytes,
        }
    }

    /// A field as the batch reads it: `text` possibly cut, `chars` and `bytes` of the whole.
    pub fn measured(
        kind: Option<String>,
        text: Option<String>,
        chars: usize,
        bytes: usize,
    ) -> Self {
        Self {
            kind,
            text,
            chars,
            bytes,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    pub name: String,
    pub value: f64,
    pub description: Option<String>,
}

/// Validates and converts the mapped fields; `Err` says which field and why.
pub fn normalize(
    paths: &FieldPaths,
    name: Field,
    value: Field,
    description: Field,
) -> Result<Normalized, String> {
    let [name_at, value_at, description_at] = &paths.labels;
    let (name_chars, description_bytes) = (name.chars, description.bytes);
    if name_chars > MAX_NAME_CHARS && matches!(name.kind.as_deref(), Some("string" | "number")) {
        return Err(format!(
            "name: {name_chars} characters long; at most {MAX_NAME_CHARS} are accepted"
        ));
    }
    let name =
        text_of("name", name_at, name)?.ok_or_else(|| format!("name: nothing at {name_at}"))?;
    if name.trim().is_empty() {
        return Err(format!("name: empty at {name_at}"));
    }
    let value = number_of(value_at, value)?;
    let description = match paths.description {
        None => None,
        Some(_) => text_of("description", description_at, description)?.filter(|d| !d.is_empty()),
    };
    if description.is_some() && description_bytes > MAX_DESCRIPTION_BYTES {
        return Err(format!(
            "description: {description_bytes} bytes long; at most {MAX_DESCRIPTION_BYTES} are accepted"
        ));
    }
    Ok(Normalized {
        name,
        value,
        description,
    })
}

/// A string or number as text; `None` when missing or null; an error for other kinds.
fn text_of(field: &str, at: &str, f: Field) -> Result<Option<String>, String> {
    match f.kind.as_deref() {
        None | Some("null") => Ok(None),
        Some("string" | "number") => Ok(f.text),
        Some(kind) => Err(format!(
            "{field}: {} at {at}; expected a string",
            article(kind)
        )),
    }
}

/// A finite double, from a JSON number or a numeric string. Thousands separators are refused
/// (`1,234` means different things in different locales), as are NaN and infinities.
fn number_of(at: &str, f: Field) -> Result<f64, String> {
    if f.chars > MAX_VALUE_CHARS && matches!(f.kind.as_deref(), Some("number" | "string")) {
        return Err(format!(
            "value: a {}-character text at {at} is not a number",
            f.chars
        ));
    }
    let text = match f.kind.as_deref() {
        None | Some("null") => return Err(format!("value: nothing at {at}")),
        Some("number" | "string") => f.text.unwrap_or_default(),
        Some(kind) => {
            return Err(format!(
                "value: {} at {at}; expected a number",
                article(kind)
            ))
        }
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("value: empty at {at}"));
    }
    let shown = abbreviate(trimmed);
    let looks_numeric = trimmed
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    if !looks_numeric {
        return Err(format!("value: {shown:?} at {at} is not a number"));
    }
    match trimmed.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!(
            "value: {shown} at {at} is out of range for a double"
        )),
        Err(_) => Err(format!("value: {shown:?} at {at} is not a number")),
    }
}

/// A value as shown in a message: long ones cut, with their length.
fn abbreviate(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= 40 {
        return text.to_owned();
    }
    let head: String = text.chars().take(24).collect();
    format!("{head}… ({chars} characters)")
}

fn article(kind: &str) -> String {
    match kind {
        "object" | "array" => format!("an {kind}"),
        other => format!("a {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> FieldPaths {
        FieldPaths {
            name: vec!["n".into()],
            value: vec!["v".into()],
            description: Some(vec!["d".into()]),
            labels: ["/n".into(), "/v".into(), "/d".into()],
        }
    }

    fn f(kind: &str, text: &str) -> Field {
        Field::new(Some(kind.into()), Some(text.into()))
    }

    fn value(kind: &str, text: &str) -> Result<f64, String> {
        normalize(&paths(), f("string", "x"), f(kind, text), Field::default()).map(|n| n.value)
    }

    /// A field as Postgres sends it to the batch: cut past `cut` characters, with the length
    /// of the whole.
    fn huge(kind: &str, cut: usize, whole: usize) -> Field {
        Field::measured(Some(kind.into()), Some("x".repeat(cut)), whole, whole)
    }

    #[test]
    fn lengths_are_those_of_the_whole_field_not_of_the_cut_text_that_arrives() {
        let name = huge("string", MAX_NAME_CHARS + 1, 10_000_000);
        assert_eq!(
            normalize(&paths(), name, f("number", "1"), Field::default()),
            Err("name: 10000000 characters long; at most 1000 are accepted".into())
        );
        let description = huge("string", MAX_DESCRIPTION_BYTES + 1, 70_000);
        assert_eq!(
            normalize(&paths(), f("string", "n"), f("number", "1"), description),
            Err("description: 70000 bytes long; at most 65536 are accepted".into())
        );
        let value = huge("number", MAX_VALUE_CHARS + 1, 5_000);
        assert_eq!(
            normalize(&paths(), f("string", "n"), value, Field::default()),
            Err("value: a 5000-character text at /v is not a number".into())
        );
    }

    #[test]
    fn numbers_come_from_json_numbers_and_numeric_strings() {
        assert_eq!(value("number", "1.5"), Ok(1.5));
        assert_eq!(value("string", " -2e3 "), Ok(-2000.0));
        assert_eq!(
            value("number", "12345678901234567890"),
            Ok(1.2345678901234567e19)
        );
    }

    #[test]
    fn bad_values_say_which_field_and_why() {
        assert_eq!(
            value("string", "abc"),
            Err(r#"value: "abc" at /v is not a number"#.into())
        );
        assert_eq!(
            value("string", "NaN"),
            Err(r#"value: "NaN" at /v is not a number"#.into())
        );
        assert_eq!(
            value("string", "inf"),
            Err(r#"value: "inf" at /v is not a number"#.into())
        );
        assert_eq!(
            value("number", "1e999"),
            Err("value: 1e999 at /v is out of range for a double".into())
        );
        assert_eq!(value("string", ""), Err("value: empty at /v".into()));
        assert_eq!(
            value("string", "1,234"),
            Err(r#"value: "1,234" at /v is not a number"#.into())
        );
        assert_eq!(
            value("object", "{}"),
            Err("value: an object at /v; expected a number".into())
        );
        assert_eq!(
            value("boolean", "true"),
            Err("value: a boolean at /v; expected a number".into())
        );
        assert_eq!(
            normalize(
                &paths(),
                f("string", "x"),
                Field::default(),
                Field::default()
            ),
            Err("value: nothing at /v".into())
        );
    }

    #[test]
    fn names_must_be_present_non_empty_and_bounded() {
        let n = |name: Field| normalize(&paths(), name, f("number", "1"), Field::default());
        assert_eq!(n(Field::default()), Err("name: nothing at /n".into()));
        assert_eq!(n(f("string", "  ")), Err("name: empty at /n".into()));
        assert_eq!(
            n(f("array", "[]")),
            Err("name: an array at /n; expected a string".into())
        );
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert!(n(f("string", &long))
            .unwrap_err()
            .starts_with("name: 1001 characters long"));
        assert_eq!(n(f("number", "42")).unwrap().name, "42");
    }

    #[test]
    fn descriptions_are_optional_and_bounded() {
        let d = |desc: Field| normalize(&paths(), f("string", "x"), f("number", "1"), desc);
        assert_eq!(d(Field::default()).unwrap().description, None);
        assert_eq!(d(f("string", "")).unwrap().description, None);
        assert_eq!(
            d(f("string", "text")).unwrap().description.as_deref(),
            Some("text")
        );
        let huge = "y".repeat(1024 * 1024);
        assert!(d(f("string", &huge))
            .unwrap_err()
            .starts_with("description: 1048576 bytes long"));
    }

    #[test]
    fn pointers_become_paths() {
        assert_eq!(pointer_to_path("/a/b~1c/~0d"), ["a", "b/c", "~d"]);
    }
}
