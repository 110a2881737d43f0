//! SQL made of constant text only: every piece of a statement is a `&'static str`, every value
//! a bind parameter, so no value and no text from a request ever becomes SQL, whatever the
//! combination of filters a request asks for.

use tokio_postgres::types::{ToSql, Type};

/// SQL text made of constant pieces only, with its bind parameters: no value, and no text from
/// a request, ever becomes SQL. The placeholders come from a constant table too.
pub struct Sql<'a> {
    pub text: String,
    pub params: Vec<(&'a (dyn ToSql + Sync), Type)>,
}

const PLACEHOLDERS: [&str; 12] = [
    "$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10", "$11", "$12",
];

impl<'a> Sql<'a> {
    pub fn new(head: &'static str) -> Self {
        Self {
            text: head.to_owned(),
            params: Vec::new(),
        }
    }

    pub fn push(&mut self, piece: &'static str) -> &mut Self {
        self.text.push_str(piece);
        self
    }

    /// Appends the placeholder of a new parameter.
    pub fn bind(&mut self, value: &'a (dyn ToSql + Sync), ty: Type) -> &mut Self {
        let placeholder = self.param(value, ty);
        self.push(placeholder)
    }

    /// Adds a parameter; its placeholder, to use as often as needed.
    pub fn param(&mut self, value: &'a (dyn ToSql + Sync), ty: Type) -> &'static str {
        let placeholder = PLACEHOLDERS[self.params.len()];
        self.params.push((value, ty));
        placeholder
    }
}
