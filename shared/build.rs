//! `embed_migrations!` reads `migrations/` at compile time but cargo does not know that: without
//! this, a new `.sql` file is silently left out of the binaries until something else changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
