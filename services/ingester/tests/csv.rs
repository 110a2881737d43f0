//! CSV sources over real HTTP: dialect edge cases, compression, and rows that cannot land are
//! rejected with their line number while the rest of the file lands intact.

mod support;

use std::io::Write;

use etl_tests::{SourceToml, TestDb, TestServer};
use poem::{endpoint::make_sync, Request, Response, Route};
use support::*;

/// This file's sources: CSV with a `note` column as the description, retried quickly.
fn noted(name: &str, url: &str) -> SourceToml {
    SourceToml::csv(name, url)
        .mapping(r#"{ source_id = "id", name = "name", value = "value", description = "note" }"#)
        .with(r#"http = { attempts = 2, initial_backoff = "10ms" }"#)
}

/// Serves `body` at `/data.csv` (and `/data.csv.gz`), optionally with a Content-Encoding.
async fn serve_csv(body: Vec<u8>, content_encoding: Option<&'static str>) -> TestServer {
    let endpoint = make_sync(move |_: Request| {
        let mut response = Response::builder().content_type("text/csv");
        if let Some(encoding) = content_encoding {
            response = response.header("content-encoding", encoding);
        }
        response.body(body.clone())
    });
    TestServer::start(Route::new().at("/:file", endpoint)).await
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    // A stored (uncompressed) deflate stream inside a valid gzip member: enough to exercise the
    // decoder without a compression crate in the tests.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    for (i, chunk) in bytes.chunks(65_535).enumerate() {
        let last = (i + 1) * 65_535 >= bytes.len();
        out.push(u8::from(last));
        let len = chunk.len() as u16;
        out.write_all(&len.to_le_bytes()).unwrap();
        out.write_all(&(!len).to_le_bytes()).unwrap();
        out.write_all(chunk).unwrap();
    }
    if bytes.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    out.extend_from_slice(&crc32(bytes).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

async fn raw_data(db: &TestDb, source: &str, id: &str) -> serde_json::Value {
    let data: String = db
        .client()
        .await
        .query_one(
            "SELECT data::text FROM raw_csv_data WHERE source = $1 AND source_id = $2",
            &[&source, &id],
        )
        .await
        .unwrap()
        .get(0);
    serde_json::from_str(&data).unwrap()
}

#[tokio::test]
async fn quoted_delimiters_quotes_and_newlines_survive_and_a_bom_is_stripped() {
    let db = TestDb::new().await;
    let body = "\u{feff}id,name,value,note\n\
                1,\"Smith, John\",1.5,\"said \"\"hi\"\"\"\n\
                2,plain,2,\"two\nlines\"\r\n\
                3,last,3,\n";
    let server = serve_csv(body.as_bytes().to_vec(), None).await;
    let toml = noted("people", &server.url("/data.csv")).to_string();

    let summary = ingester(&db, &toml).run_source("people").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_csv_data", "people").await,
        ["1", "2", "3"]
    );
    assert_eq!(
        raw_data(&db, "people", "1").await,
        serde_json::json!({ "id": "1", "name": "Smith, John", "value": "1.5", "note": "said \"hi\"" })
    );
    assert_eq!(raw_data(&db, "people", "2").await["note"], "two\nlines");
    assert_eq!(raw_data(&db, "people", "3").await["note"], "");
}

#[tokio::test]
async fn a_custom_delimiter_and_quote_are_honoured() {
    let db = TestDb::new().await;
    let body = "id;name;value;note\n1;'a;b';1;'it''s'\n";
    let server = serve_csv(body.as_bytes().to_vec(), None).await;
    let toml = noted("semi", &server.url("/data.csv"))
        .with(r#"csv = { delimiter = ";", quote = "'" }"#)
        .to_string();

    ingester(&db, &toml).run_source("semi").await.unwrap();

    let data = raw_data(&db, "semi", "1").await;
    assert_eq!(
        (data["name"].as_str(), data["note"].as_str()),
        (Some("a;b"), Some("it's"))
    );
}

#[tokio::test]
async fn a_rejected_row_of_a_custom_dialect_keeps_the_bytes_the_source_sent() {
    let db = TestDb::new().await;
    // Row 2 has a field too many; its quoted fields use the source's own quote character.
    let bad = "2;'c;d';2;'it''s';extra";
    let body = format!("id;name;value;note\n1;'a;b';1;x\n{bad}\n3;e;3;y\n");
    let server = serve_csv(body.into_bytes(), None).await;
    let toml = noted("dialect", &server.url("/data.csv"))
        .with(r#"csv = { delimiter = ";", quote = "'" }"#)
        .to_string();

    let summary = ingester(&db, &toml).run_source("dialect").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(raw_ids(&db, "raw_csv_data", "dialect").await, ["1", "3"]);
    let rejects = rejects(&db, "dialect").await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(
        String::from_utf8_lossy(&rejects[0].4),
        bad,
        "the reject's raw bytes are the line as received"
    );
}

#[tokio::test]
async fn gzip_is_decoded_from_content_encoding_and_from_a_gz_file() {
    let db = TestDb::new().await;
    let body = b"id,name,value,note\n1,a,1,x\n2,b,2,y\n".to_vec();
    let encoded = serve_csv(gzip(&body), Some("gzip")).await;
    let file = serve_csv(gzip(&body), None).await;
    let toml = format!(
        "{}\n{}",
        noted("encoded", &encoded.url("/data.csv")),
        noted("gzfile", &file.url("/data.csv.gz"))
    );
    let ingester = ingester(&db, &toml);

    for name in ["encoded", "gzfile"] {
        let summary = ingester.run_source(name).await.unwrap();
        assert_eq!(summary.error, None, "{name}");
        assert_eq!(
            raw_ids(&db, "raw_csv_data", name).await,
            ["1", "2"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn ragged_and_non_utf8_rows_are_rejected_with_line_numbers_and_later_rows_land_intact() {
    let db = TestDb::new().await;
    let mut body =
        b"id,name,value,note\n1,a,1,x\n2,too,many,fields,here\n3,\"multi\nline\",3,y\n4,short\n"
            .to_vec();
    body.extend_from_slice(b"5,caf\xe9,5,latin-1\n6,f,6,z\n,noid,7,w\n");
    let server = serve_csv(body, None).await;
    let toml = noted("ragged", &server.url("/data.csv")).to_string();

    let summary = ingester(&db, &toml).run_source("ragged").await.unwrap();

    assert_eq!(summary.error, None, "bad rows do not fail the run");
    assert_eq!(
        raw_ids(&db, "raw_csv_data", "ragged").await,
        ["1", "3", "6"]
    );
    assert_eq!(
        raw_data(&db, "ragged", "6").await["name"],
        "f",
        "later rows are not shifted"
    );
    let rejects = rejects(&db, "ragged").await;
    let found: Vec<(Option<i64>, &str, &[u8])> = rejects
        .iter()
        .map(|r| (r.0, r.3.as_str(), r.4.as_slice()))
        .collect();
    assert_eq!(
        found,
        [
            (
                Some(3),
                "expected 4 fields as in the header, found 5",
                &b"2,too,many,fields,here"[..]
            ),
            (
                Some(6),
                "expected 4 fields as in the header, found 2",
                &b"4,short"[..]
            ),
            (
                Some(7),
                "field \"name\" is not valid UTF-8",
                &b"5,caf\xe9,5,latin-1"[..]
            ),
            (
                Some(9),
                "source_id column \"id\" is empty",
                &b",noid,7,w"[..]
            ),
        ]
    );
    let run = run_row(&db, summary.run_id).await;
    assert_eq!((run.processed, run.inserted, run.rejected), (7, 3, 4));
}

#[tokio::test]
async fn an_empty_file_and_a_header_only_file_are_successful_runs_with_nothing_landed() {
    let db = TestDb::new().await;
    let empty = serve_csv(Vec::new(), None).await;
    let header_only = serve_csv(b"id,name,value,note\n".to_vec(), None).await;
    let toml = format!(
        "{}\n{}",
        noted("empty", &empty.url("/data.csv")),
        noted("headeronly", &header_only.url("/data.csv"))
    );
    let ingester = ingester(&db, &toml);

    for name in ["empty", "headeronly"] {
        let summary = ingester.run_source(name).await.unwrap();
        let run = run_row(&db, summary.run_id).await;
        assert_eq!(
            (run.status.as_str(), run.processed),
            ("success", 0),
            "{name}"
        );
        assert!(raw_ids(&db, "raw_csv_data", name).await.is_empty());
    }
}

#[tokio::test]
async fn a_header_without_the_mapped_id_column_fails_the_run_naming_the_column() {
    let db = TestDb::new().await;
    let server = serve_csv(b"key,name,value,note\n1,a,1,x\n".to_vec(), None).await;
    let toml = noted("nokey", &server.url("/data.csv")).to_string();

    let summary = ingester(&db, &toml).run_source("nokey").await.unwrap();

    let error = summary.error.unwrap();
    assert!(
        error.contains("no column \"id\" (mapping.source_id)"),
        "{error}"
    );
    assert!(error.contains("key, name, value, note"), "{error}");
}

#[tokio::test]
async fn the_last_copy_of_a_duplicated_id_wins() {
    let db = TestDb::new().await;
    let server = serve_csv(
        b"id,name,value,note\n1,first,1,x\n2,b,2,y\n1,second,1,x\n".to_vec(),
        None,
    )
    .await;
    let toml = noted("dups", &server.url("/data.csv")).to_string();

    let summary = ingester(&db, &toml).run_source("dups").await.unwrap();

    assert_eq!(raw_data(&db, "dups", "1").await["name"], "second");
    let run = run_row(&db, summary.run_id).await;
    assert_eq!((run.processed, run.inserted, run.updated), (3, 2, 1));
}

/// A CSV source (`id, name, value, note`) whose records may be at most `limit` bytes.
fn limited(name: &str, url: &str, limit: u64) -> String {
    SourceToml::csv(name, url)
        .mapping(r#"{ source_id = "id", name = "name", value = "value", description = "note" }"#)
        .with(&format!(
            "http = {{ attempts = 1, max_record_bytes = {limit} }}"
        ))
        .to_string()
}

#[tokio::test]
async fn a_record_over_max_record_bytes_is_rejected_with_its_line_and_first_bytes() {
    let db = TestDb::new().await;
    // Line 3 starts a record of two lines and 5,000-odd bytes; line 6 has a field too many.
    let long = format!("2,\"long\n{}\",2,x", "y".repeat(5_000));
    let body = format!("id,name,value,note\n1,a,1,x\n{long}\n3,c,3,z\n4,d,4,z,extra\n5,e,5,z\n");
    let server = serve_csv(body.into_bytes(), None).await;
    let toml = limited("wide", &server.url("/data.csv"), 1_024);

    let summary = ingester(&db, &toml).run_source("wide").await.unwrap();

    assert_eq!(
        summary.error, None,
        "an oversized record does not fail the run"
    );
    assert_eq!(raw_ids(&db, "raw_csv_data", "wide").await, ["1", "3", "5"]);
    let rejects = rejects(&db, "wide").await;
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    let (line, _, _, reason, raw) = &rejects[0];
    assert_eq!(*line, Some(3));
    assert_eq!(
        reason,
        &format!(
            "the record is {} bytes, over the limit of 1024 bytes (http.max_record_bytes); \
             its first 1024 bytes are kept",
            long.len() + 1
        )
    );
    assert_eq!(raw.as_slice(), &long.as_bytes()[..1_024]);
    assert_eq!(
        rejects[1].0,
        Some(6),
        "lines after the dropped record keep their numbers"
    );
}

#[tokio::test]
async fn an_unterminated_quote_fails_the_run_after_landing_the_rows_before_it() {
    let db = TestDb::new().await;
    let rest = "9,i,9,z\n".repeat(20_000);
    let body = format!("id,name,value,note\n1,a,1,x\n2,b,2,y\n3,\"never closed,3,z\n{rest}");
    let server = serve_csv(body.into_bytes(), None).await;
    let toml = limited("open", &server.url("/data.csv"), 4_096);

    let summary = ingester(&db, &toml).run_source("open").await.unwrap();

    let error = summary.error.expect("the run fails");
    assert!(
        error.contains("the quoted field opened on line 4 is never closed")
            && error.contains("the rows before it landed"),
        "{error}"
    );
    assert_eq!(raw_ids(&db, "raw_csv_data", "open").await, ["1", "2"]);
    assert!(rejects(&db, "open").await.is_empty());
}

/// The first rows of the Palmer Station penguin data (LTER, CC0) as published: no column is a
/// key on its own, since each species numbers its samples from 1.
const PENGUINS: &str = "\
studyName,Sample Number,Species,Region,Island,Stage,Individual ID,Clutch Completion,Date Egg,Culmen Length (mm),Culmen Depth (mm),Flipper Length (mm),Body Mass (g),Sex,Delta 15 N (o/oo),Delta 13 C (o/oo),Comments
PAL0708,1,Adelie Penguin (Pygoscelis adeliae),Anvers,Torgersen,\"Adult, 1 Egg Stage\",N1A1,Yes,2007-11-11,39.1,18.7,181,3750,MALE,,,Not enough blood for isotopes.
PAL0708,2,Adelie Penguin (Pygoscelis adeliae),Anvers,Torgersen,\"Adult, 1 Egg Stage\",N1A2,Yes,2007-11-11,39.5,17.4,186,3800,FEMALE,8.94956,-24.69454,
PAL0708,1,Gentoo penguin (Pygoscelis papua),Anvers,Biscoe,\"Adult, 1 Egg Stage\",N31A1,Yes,2007-11-27,46.1,13.2,211,4500,FEMALE,7.993,-25.5139,
PAL0708,2,Gentoo penguin (Pygoscelis papua),Anvers,Biscoe,\"Adult, 1 Egg Stage\",N31A2,Yes,2007-11-27,50,16.3,230,5700,MALE,8.14756,-25.39369,
PAL0708,1,Chinstrap penguin (Pygoscelis antarctica),Anvers,Dream,\"Adult, 1 Egg Stage\",N61A1,No,2007-11-19,46.5,17.9,192,3500,FEMALE,9.03935,-24.30229,
PAL0708,,Chinstrap penguin (Pygoscelis antarctica),Anvers,Dream,\"Adult, 1 Egg Stage\",N61A2,No,2007-11-19,50,19.5,196,3900,MALE,8.92069,-24.23592,
";

#[tokio::test]
async fn a_two_column_key_keeps_rows_that_share_either_column_apart() {
    let db = TestDb::new().await;
    let server = serve_csv(PENGUINS.as_bytes().to_vec(), None).await;
    let toml = SourceToml::csv("penguins", &server.url("/penguins.csv"))
        .mapping(
            r#"{ source_id = ["Species", "Sample Number"], name = "Individual ID", value = "Body Mass (g)" }"#,
        )
        .to_string();

    let summary = ingester(&db, &toml).run_source("penguins").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_csv_data", "penguins").await,
        [
            "Adelie Penguin (Pygoscelis adeliae)|1",
            "Adelie Penguin (Pygoscelis adeliae)|2",
            "Chinstrap penguin (Pygoscelis antarctica)|1",
            "Gentoo penguin (Pygoscelis papua)|1",
            "Gentoo penguin (Pygoscelis papua)|2",
        ]
    );
    assert_eq!(
        raw_data(&db, "penguins", "Gentoo penguin (Pygoscelis papua)|2").await["Individual ID"],
        "N31A2"
    );
    let rejects = rejects(&db, "penguins").await;
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(
        (rejects[0].0, rejects[0].3.as_str()),
        (Some(7), "source_id part \"Sample Number\" is empty")
    );
}

#[tokio::test]
async fn a_positional_key_numbers_the_rows_after_the_header() {
    let db = TestDb::new().await;
    let body = "reading,label\n3.5,\"multi\nline\"\n3.5,same reading\n,no reading\n";
    let server = serve_csv(body.as_bytes().to_vec(), None).await;
    let toml = SourceToml::csv("readings", &server.url("/r.csv"))
        .mapping(r#"{ source_id = { row = true }, name = "label", value = "reading" }"#)
        .to_string();

    let summary = ingester(&db, &toml).run_source("readings").await.unwrap();

    assert_eq!(summary.error, None);
    assert_eq!(
        raw_ids(&db, "raw_csv_data", "readings").await,
        ["1", "2", "3"]
    );
    assert_eq!(
        raw_data(&db, "readings", "2").await["label"],
        "same reading"
    );
}

#[tokio::test]
async fn an_unchanged_file_answers_304_and_its_run_reads_and_deletes_nothing() {
    let db = TestDb::new().await;
    let version = std::sync::Arc::new(std::sync::Mutex::new(1));
    let bodies_sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (current, sent) = (version.clone(), bodies_sent.clone());
    let server = TestServer::start(Route::new().at(
        "/data.csv",
        make_sync(move |req: Request| {
            let v = *current.lock().unwrap();
            let etag = format!("\"v{v}\"");
            if req
                .headers()
                .get("if-none-match")
                .and_then(|h| h.to_str().ok())
                == Some(&etag)
            {
                return Response::builder()
                    .status(poem::http::StatusCode::NOT_MODIFIED)
                    .header("etag", etag)
                    .finish();
            }
            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = if v == 1 {
                "id,name,value\n1,a,1\n2,b,2\n"
            } else {
                "id,name,value\n1,a,1\n"
            };
            Response::builder().header("etag", etag).body(body)
        }),
    ))
    .await;
    let toml = SourceToml::csv("cached", &server.url("/data.csv"))
        .with(r#"deletes = "snapshot""#)
        .to_string();
    let ingester = ingester(&db, &toml);

    let first = ingester.run_source("cached").await.unwrap();
    let unchanged = ingester.run_source("cached").await.unwrap();

    assert_eq!((first.error, unchanged.error.clone()), (None, None));
    assert_eq!(bodies_sent.load(std::sync::atomic::Ordering::SeqCst), 1);
    let run = run_row(&db, unchanged.run_id).await;
    assert_eq!(
        (
            run.status.as_str(),
            run.processed,
            run.inserted,
            run.updated
        ),
        ("success", 0, 0, 0),
        "a 304 run reads and writes nothing"
    );
    let client = db.client().await;
    let live = || async {
        client
            .query_one(
                "SELECT count(*) FROM raw_csv_data WHERE source = 'cached' AND deleted_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(live().await, 2, "a 304 snapshot deletes nothing");

    *version.lock().unwrap() = 2;
    let changed = ingester.run_source("cached").await.unwrap();
    assert_eq!(changed.error, None);
    assert_eq!(bodies_sent.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(
        live().await,
        1,
        "the changed file is read, and row 2 is gone"
    );
}
