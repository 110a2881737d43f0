//! The published spec: what poem-openapi derives from the API's types, plus what it has no
//! attribute for (examples on parameters and enum schemas, names for enum values that are not
//! identifiers, the API key's security scheme, which poem-openapi would also enforce, while
//! keys are optional here: see `access`), added here in one place so that
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
        "updated_since" => json!("2026-12-01T09:30:00Z"),
        "min_value" => json!(10.0),
        "max_value" => json!(99.5),
        "sort" => json!("-updated_at"),
        "source_id" => json!("sku-1042"),
        "service" => json!("ingester"),
        "status" => json!("failed"),
        "stage" => json!("ingest"),
        "format" => json!("csv"),
        "action" => json!("run"),
        "If-None-Match" => json!("W/\"d0123456789abcdef\""),
        _ => return None,
    })
}

/// The name of the API key scheme in the spec.
const SECURITY_SCHEME: &str = "apiKey";

/// Names for the values of enums whose values are not identifiers, for generators that name
/// them (`x-enum-varnames`: openapi-python-client, openapi-generator), in the values' order.
fn enum_names(schema: &str) -> Option<Value> {
    Some(match schema {
        "Sort" => json!(["ID", "NEWEST_FIRST", "VALUE_ASCENDING", "VALUE_DESCENDING"]),
        _ => return None,
    })
}

/// `generated` (poem-openapi's JSON) with the examples, the enum names and the API key added.
pub fn document(generated: &str) -> Value {
    let mut spec: Value = serde_json::from_str(generated).expect("poem-openapi writes JSON");
    if let Some(paths) = spec["paths"].as_object_mut() {
        for operations in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in operations.values_mut() {
                // Every operation but the probes declares the API key, so generated clients
                // send one.
                let probe = op["tags"]
                    .as_array()
                    .is_some_and(|t| t.contains(&json!("Health")));
                if !probe {
                    op["security"] = json!([{ SECURITY_SCHEME: [] }]);
                }
                let parameters = op.get_mut("parameters").and_then(Value::as_array_mut);
                for parameter in parameters.into_iter().flatten() {
                    let name = parameter["name"].as_str().unwrap_or_default();
                    if let Some(example) = parameter_example(name) {
                        parameter["example"] = example;
                    }
                }
            }
        }
    }
    spec["components"]["securitySchemes"] = json!({
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `etl-query api-key <name>`, as `Authorization: \
                Bearer <key>`. Required when the service has keys (`QUERY_API_KEYS_FILE`); \
                without keys the service lets every request in and ignores the header."
        }
    });
    if let Some(schemas) = spec["components"]["schemas"].as_object_mut() {
        for (name, schema) in schemas.iter_mut() {
            if let Some(names) = enum_names(name) {
                schema["x-enum-varnames"] = names;
            }
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
