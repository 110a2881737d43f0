//! The published spec: what poem-openapi derives from the API's types, plus the examples it
//! has no attribute for (on parameters, and on enum schemas), added here in one place so that
//! `/openapi.json`, `/openapi.yaml`, Swagger UI and the committed `openapi.json` all carry
//! them. A unit test fails when a parameter or a component schema has none.

use serde_json::{json, Value};

/// An example value of each query or path parameter, by name (a name means the same thing in
/// every operation that takes it).
fn parameter_example(name: &str) -> Option<Value> {
    Some(match name {
        "page" => json!(2),
        "page_size" => json!(100),
        "source" => json!("products"),
        "search" => json!("espresso"),
        "cursor" => json!("v1.2.1042"),
        _ => return None,
    })
}

/// `generated` (poem-openapi's JSON) with the examples added.
pub fn document(generated: &str) -> Value {
    let mut spec: Value = serde_json::from_str(generated).expect("poem-openapi writes JSON");
    if let Some(paths) = spec["paths"].as_object_mut() {
        for operation in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in operation.values_mut() {
                let Some(parameters) = op.get_mut("parameters").and_then(Value::as_array_mut)
                else {
                    continue;
                };
                for parameter in parameters {
                    let name = parameter["name"].as_str().unwrap_or_default();
                    if let Some(example) = parameter_example(name) {
                        parameter["example"] = example;
                    }
                }
            }
        }
    }
    if let Some(schemas) = spec["components"]["schemas"].as_object_mut() {
        for schema in schemas.values_mut() {
            if schema.get("example").is_none() {
                if let Some(first) = schema.get("enum").and_then(|e| e.get(0)).cloned() {
                    schema["example"] = first;
                }
            }
        }
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_and_schema_has_an_example() {
        let spec = document(&crate::openapi_generated());
        for (path, operations) in spec["paths"].as_object().unwrap() {
            for (method, op) in operations.as_object().unwrap() {
                for parameter in op["parameters"].as_array().into_iter().flatten() {
                    assert!(
                        parameter.get("example").is_some(),
                        "{method} {path}: parameter {} has no example",
                        parameter["name"]
                    );
                }
            }
        }
        for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
            assert!(
                schema.get("example").is_some(),
                "schema {name} has no example"
            );
        }
    }
}
