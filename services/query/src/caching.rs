//! HTTP caching: `ETag` and `304 Not Modified` on `/data` pages, records and `/stats`, and a
//! `Cache-Control` on every answer saying how fresh it is.
//!
//! A tag is derived from what changes when the answer changes, never from the body: for data,
//! the normalizer's checkpoints (every write to `normalized_data` moves one in the same
//! transaction) and the partition each source is served from (a bulk build or a replay swaps
//! it); for `/stats`, the instant its shared snapshot was computed. Tags are weak (`W/`): an
//! answer is the same whatever its compression.

/// Fresh as of now, may change at any moment: store it, but ask again (with the tag) each time.
pub const REVALIDATE: &str = "no-cache";
/// Not worth keeping: probes, exports.
pub const NO_STORE: &str = "no-store";

/// The data version: a digest of every checkpoint and of every served partition, over the
/// rows of [`versioned_from`].
macro_rules! data_version {
    () => {
        "md5(coalesce(string_agg(concat_ws(':', source, c.last_processed_id, c.total_processed,
             c.normalized_rows, extract(epoch FROM c.updated_at), p.relid::oid), ',' ORDER BY source), ''))"
    };
}
pub(crate) use data_version;

/// One row per source, checkpointed or served (`c` the checkpoint, `p` the served partition).
macro_rules! versioned_from {
    () => {
        " FROM etl_checkpoint c
          FULL JOIN (SELECT source, relid FROM etl_partitions WHERE role = 'live') p USING (source)"
    };
}
pub(crate) use versioned_from;

/// One statement, in O(sources).
pub const DATA_VERSION: &str = concat!("SELECT ", data_version!(), versioned_from!());

/// The tag of every data answer at `version` (a [`DATA_VERSION`]).
pub fn data_tag(version: &str) -> String {
    format!("W/\"d{}\"", version.get(..16).unwrap_or(version))
}

/// The tag of the `/stats` snapshot computed at `generated_at`.
pub fn stats_tag(generated_at: time::OffsetDateTime) -> String {
    format!("W/\"s{:x}\"", generated_at.unix_timestamp_nanos())
}

/// `max-age` for an answer that is `age` old and may be reused until `max_age`.
pub fn max_age(max_age: std::time::Duration, age: std::time::Duration) -> String {
    format!("max-age={}", max_age.saturating_sub(age).as_secs())
}

/// Whether `If-None-Match: header` matches `tag`, by weak comparison (RFC 9110 13.1.2): `*`,
/// or any tag of the list with the same opaque part, `W/` or not.
pub fn none_match(header: Option<&str>, tag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let Some(header) = header else {
        return false;
    };
    header.trim() == "*" || header.split(',').any(|t| opaque(t) == opaque(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_match_weakly_in_lists_and_star_matches_all() {
        let tag = data_tag("0123456789abcdef0123");
        assert_eq!(tag, "W/\"d0123456789abcdef\"");
        assert!(none_match(Some(&tag), &tag));
        assert!(none_match(Some("\"d0123456789abcdef\""), &tag));
        assert!(none_match(Some("W/\"x\", W/\"d0123456789abcdef\""), &tag));
        assert!(none_match(Some(" * "), &tag));
        assert!(!none_match(Some("W/\"d0123456789abcdee\""), &tag));
        assert!(!none_match(None, &tag));
        assert!(!none_match(Some(""), &tag));
    }

    #[test]
    fn max_age_counts_down_to_zero() {
        use std::time::Duration;
        let five = Duration::from_secs(5);
        assert_eq!(max_age(five, Duration::from_millis(1_500)), "max-age=3");
        assert_eq!(max_age(five, Duration::from_secs(9)), "max-age=0");
    }
}
