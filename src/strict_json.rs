//! Strict JSON decoding for tagged enums: serde ignores unknown fields on the unit variants of
//! an internally tagged enum even with `deny_unknown_fields`, so a typo in a message would pass
//! silently. Parsing here re-serializes what was parsed and refuses any field it lacks.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Parses `value` into `T`, refusing top-level fields that `T` does not have.
pub fn from_value<T: DeserializeOwned + Serialize>(value: serde_json::Value) -> Result<T, String> {
    let parsed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    if let (Some(given), Ok(serde_json::Value::Object(known))) =
        (value.as_object(), serde_json::to_value(&parsed))
        && let Some(extra) = given.keys().find(|k| !known.contains_key(*k))
    {
        return Err(format!("unknown field `{extra}`"));
    }
    Ok(parsed)
}

/// [`from_value`] on bytes.
pub fn from_slice<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    from_value(value)
}
