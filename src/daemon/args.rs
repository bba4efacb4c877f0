//! Command arguments checked as QEMU's QAPI input visitor checks them, with its texts:
//! "Parameter 'x' is missing", "Invalid parameter type for 'x', expected: integer",
//! "Parameter 'x' is unexpected" (every member must be taken by the command).

use serde_json::{Map, Value};

use super::qmp::QmpError;

/// A command's arguments being taken apart.
pub struct Args {
    map: Map<String, Value>,
    /// Where the members sit, for error texts of nested objects ("file.filename").
    prefix: String,
}

fn type_error(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

impl Args {
    /// The arguments of a command (an absent `arguments` is an empty object).
    pub fn new(map: Map<String, Value>) -> Args {
        Args {
            map,
            prefix: String::new(),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// A nested object member, taken apart the same way.
    pub fn object(&mut self, key: &str) -> Result<Option<Args>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Args {
                map: m,
                prefix: format!("{}.", self.full(key)),
            })),
            Some(_) => Err(type_error(&self.full(key), "object")),
        }
    }

    /// Arguments nested under member `key` (an inline child), whose errors name their
    /// place as QEMU does ("file.filename").
    pub fn nested(&self, key: &str, map: Map<String, Value>) -> Args {
        Args {
            map,
            prefix: format!("{}.", self.full(key)),
        }
    }

    /// Takes a member as it is.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// Whether the member is there (without taking it).
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    fn missing(&self, key: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.full(key)))
    }

    /// An optional string.
    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(&self.full(key), "string")),
        }
    }

    /// A required string.
    pub fn str(&mut self, key: &str) -> Result<String, QmpError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional signed integer.
    pub fn opt_int(&mut self, key: &str) -> Result<Option<i64>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(v) => Ok(Some(v)),
                None => Err(type_error(&self.full(key), "integer")),
            },
            Some(_) => Err(type_error(&self.full(key), "integer")),
        }
    }

    /// A required signed integer.
    pub fn int(&mut self, key: &str) -> Result<i64, QmpError> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional unsigned integer (sizes, offsets).
    pub fn opt_size(&mut self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Ok(Some(v)),
                None => Err(type_error(&self.full(key), "uint64")),
            },
            Some(_) => Err(type_error(&self.full(key), "integer")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(&self.full(key), "boolean")),
        }
    }

    /// An optional enum member, by its QAPI names.
    pub fn opt_enum<T: Copy>(
        &mut self,
        key: &str,
        values: &[(&str, T)],
    ) -> Result<Option<T>, QmpError> {
        let Some(s) = self.opt_str(key)? else {
            return Ok(None);
        };
        match values.iter().find(|(n, _)| *n == s) {
            Some((_, v)) => Ok(Some(*v)),
            None => Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{s}'",
                self.full(key)
            ))),
        }
    }

    /// Fails on any member no one took (QEMU's "Parameter 'x' is unexpected").
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full(k)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().unwrap().clone())
    }

    #[test]
    fn qemus_texts() {
        let mut a = args(json!({"speed": "x", "device": 3, "extra": 1}));
        assert_eq!(
            a.opt_int("speed").unwrap_err().desc,
            "Invalid parameter type for 'speed', expected: integer"
        );
        assert_eq!(
            a.str("device").unwrap_err().desc,
            "Invalid parameter type for 'device', expected: string"
        );
        assert_eq!(
            a.str("job-id").unwrap_err().desc,
            "Parameter 'job-id' is missing"
        );
        assert_eq!(
            a.finish().unwrap_err().desc,
            "Parameter 'extra' is unexpected"
        );
        let mut a = args(json!({"file": {"filename": 1}}));
        let mut f = a.object("file").unwrap().unwrap();
        assert_eq!(
            f.str("filename").unwrap_err().desc,
            "Invalid parameter type for 'file.filename', expected: string"
        );
    }
}
