use super::*;
use arrow_array::{Int64Array, StringArray};
use arrow_schema::{Field, Schema};

fn batch(n: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("site", DataType::Utf8, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..n)),
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 3 != 0).then(|| format!("s{i}.example"))),
            )),
        ],
    )
    .expect("batch")
}

fn arrow_file(batches: &[RecordBatch]) -> Vec<u8> {
    let mut w =
        arrow_ipc::writer::FileWriter::try_new(Vec::new(), &batches[0].schema()).expect("w");
    for b in batches {
        w.write(b).expect("write");
    }
    w.finish().expect("finish");
    w.into_inner().expect("inner")
}

fn run(format: Option<Format>, bytes: &[u8], key: Option<&str>) -> Result<Ingested> {
    let key = KeySpec {
        column: key.map(str::to_string),
        ..KeySpec::default()
    };
    ingest(format, bytes, &key, Vec::new(), &IngestLimits::default()).map(|(i, _)| i)
}

fn parquet(batch: &RecordBatch, props: ::parquet::file::properties::WriterProperties) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = ::parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .expect("writer");
    w.write(batch).expect("write");
    w.close().expect("close");
    out
}

fn run_parquet(bytes: &[u8]) -> Result<Ingested> {
    run_parquet_with(bytes, IngestLimits::default())
}

fn run_parquet_with(bytes: &[u8], limits: IngestLimits) -> Result<Ingested> {
    let spool = tempfile::tempdir().expect("spool");
    let limits = IngestLimits {
        spool_dir: Some(spool.path().to_path_buf()),
        batch_rows: 1000,
        ..limits
    };
    ingest(
        Some(Format::Parquet),
        bytes,
        &KeySpec::default(),
        Vec::new(),
        &limits,
    )
    .map(|(i, _)| i)
}

/// An input of tests/corpus/fuzz/ingest_parquet, without the fuzz target's selector byte.
fn fuzz_input(name: &str) -> Vec<u8> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/corpus/fuzz/ingest_parquet"
    );
    let mut input = std::fs::read(format!("{dir}/{name}")).expect("corpus file");
    input.remove(0);
    input
}

#[test]
fn parquet_pages_declaring_more_than_the_page_limit_are_refused_before_decompression() {
    use ::parquet::basic::{Compression, ZstdLevel};
    use ::parquet::file::properties::WriterProperties;
    // a decompression bomb in miniature: 200,000 equal values in one zstd page, a few
    // KB on the wire and 4.6 MB once decompressed
    let schema = Arc::new(Schema::new(vec![Field::new("site", DataType::Utf8, false)]));
    let same = StringArray::from_iter_values((0..200_000).map(|_| "same.example.com"));
    let b = RecordBatch::try_new(schema, vec![Arc::new(same)]).expect("batch");
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_dictionary_enabled(false)
        .set_data_page_size_limit(usize::MAX)
        .set_data_page_row_count_limit(usize::MAX)
        .build();
    let bytes = parquet(&b, props);
    assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());

    let got = run_parquet(&bytes).expect("within the default limits");
    assert_eq!(got.rows, 200_000);
    for limits in [
        IngestLimits {
            max_parquet_page: 1 << 20,
            ..IngestLimits::default()
        },
        // the budget over one column
        IngestLimits {
            parquet_page_budget: 1 << 20,
            ..IngestLimits::default()
        },
    ] {
        let e = run_parquet_with(&bytes, limits).expect_err("refused");
        assert_eq!(e.code(), "unsupported_parquet", "{e}");
        assert!(e.to_string().contains("at most 1048576 bytes"), "{e}");
    }
}

#[test]
fn parquet_with_many_pages_and_row_groups_is_read_whole() {
    use ::parquet::file::properties::WriterProperties;
    let b = batch(10_000);
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(3_000))
        .set_data_page_row_count_limit(100)
        .set_write_batch_size(100)
        .build();
    let bytes = parquet(&b, props);
    let got = run_parquet(&bytes).expect("many pages");
    assert_eq!(got.rows, 10_000);
    assert_eq!(got.columns.len(), 2);
}

#[test]
fn parquet_dictionary_page_declaring_more_values_than_it_holds_is_refused() {
    // fuzz/ingest_parquet found a 9 KB upload whose dictionary page declared about two
    // billion values, for which the decoder reserved 8 GB (that input, kept in
    // tests/corpus/fuzz, is now refused earlier, by the header walk). Here a valid file's
    // first dictionary page (column id: 3 values, 24 bytes) is made to declare 63.
    let props = ::parquet::file::properties::WriterProperties::builder().build();
    let mut bytes = parquet(&batch(3), props);
    // DictionaryPageHeader (PageHeader field 7) { num_values: 3 } as Thrift compact
    let at = bytes
        .windows(3)
        .position(|w| w == [0x4c, 0x15, 0x06])
        .expect("dictionary page header");
    bytes[at + 2] = 0x7e; // zigzag 63
    let e = run_parquet(&bytes).expect_err("refused");
    assert_eq!(e.code(), "malformed_parquet", "{e}");
    assert!(
        e.to_string()
            .contains("a dictionary page of column id declares 63 values in 24 bytes"),
        "{e}"
    );
}

#[test]
fn parquet_page_header_with_a_huge_unknown_list_of_booleans_is_refused_at_once() {
    // found by fuzz/ingest_parquet: parquet skipped 2^31 list elements reading no byte
    let input = fuzz_input("page-header-unknown-list-of-bools");
    let started = std::time::Instant::now();
    let e = run_parquet(&input).expect_err("refused");
    assert_eq!(e.code(), "malformed_parquet", "{e}");
    assert!(e.to_string().contains("page header"), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn parquet_footer_declaring_a_4_gb_binary_field_is_refused_without_allocating_it() {
    // found by fuzz/ingest_parquet when the walk used Apache Thrift's reader, which
    // allocated the declared length first
    let e = run_parquet(&fuzz_input("footer-binary-declares-4-gb")).expect_err("refused");
    assert_eq!(e.code(), "malformed_parquet", "{e}");
    assert!(e.to_string().contains("footer"), "{e}");
}

#[test]
fn parquet_delta_byte_array_pages_are_refused_by_name() {
    use ::parquet::basic::Encoding;
    use ::parquet::file::properties::WriterProperties;
    for encoding in [
        Encoding::DELTA_LENGTH_BYTE_ARRAY,
        Encoding::DELTA_BYTE_ARRAY,
    ] {
        let props = WriterProperties::builder()
            .set_column_dictionary_enabled("site".into(), false)
            .set_column_encoding("site".into(), encoding)
            .build();
        let e = run_parquet(&parquet(&batch(50), props)).expect_err("delta refused");
        assert_eq!(e.code(), "unsupported_parquet", "{encoding}: {e}");
        assert!(e.to_string().contains("column site"), "{e}");
    }
    // the same list with its defaults (dictionary) is read
    let props = WriterProperties::builder().build();
    assert_eq!(
        run_parquet(&parquet(&batch(50), props))
            .expect("plain")
            .rows,
        50
    );
}

#[test]
fn parquet_fixed_length_columns_wider_than_4_kib_are_refused() {
    use arrow_array::FixedSizeBinaryArray;
    let rows = |width: usize| {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "blob",
            DataType::FixedSizeBinary(width as i32),
            false,
        )]));
        let values = (0..3u8).map(|i| vec![i; width]);
        let array = FixedSizeBinaryArray::try_from_iter(values).expect("array");
        RecordBatch::try_new(schema, vec![Arc::new(array)]).expect("batch")
    };
    let props = || ::parquet::file::properties::WriterProperties::builder().build();
    let e = run_parquet(&parquet(&rows(8192), props())).expect_err("too wide");
    assert_eq!(e.code(), "unsupported_parquet", "{e}");
    assert!(e.to_string().contains("column blob"), "{e}");
    assert_eq!(
        run_parquet(&parquet(&rows(16), props()))
            .expect("uuid")
            .rows,
        3
    );
}

#[test]
fn csv_exports_with_bom_and_other_delimiters() {
    for (text, delim) in [
        (
            "\u{feff}id;site;n\n1;a.example;3\n2;b.example;4\n",
            "semicolon+BOM",
        ),
        ("id\tsite\tn\n1\ta.example\t3\n", "tab"),
        (
            "\"id\",\"site; or not\",n\n1,\"a.example\",3\n",
            "quoted comma",
        ),
    ] {
        let got = run(
            None,
            text.as_bytes(),
            Some("site").filter(|_| !delim.starts_with("quoted")),
        )
        .unwrap_or_else(|e| panic!("{delim}: {e}"));
        assert_eq!(got.format, Format::Csv, "{delim}");
        assert_eq!(got.columns[0].name, "id", "{delim}");
        assert_eq!(got.columns.len(), 3, "{delim}");
        assert_eq!(got.columns[2].data_type, "Int64", "{delim}");
    }
}

#[test]
fn arrow_file_round_trip() {
    let f = arrow_file(&[batch(100), batch(50)]);
    let got = run(None, &f, Some("site")).expect("ingest");
    assert_eq!(got.format, Format::ArrowFile);
    assert_eq!(got.rows, 150);
}

/// Ingest a CSV with `key`; the sealed stream's schema and its batches.
fn sealed_csv(csv: &str, key: &KeySpec) -> Result<(Ingested, SchemaRef, Vec<RecordBatch>)> {
    let (ingested, sink) = ingest(
        Some(Format::Csv),
        csv.as_bytes(),
        key,
        Vec::new(),
        &IngestLimits::default(),
    )?;
    let reader = arrow_ipc::reader::StreamReader::try_new(&sink[..], None).expect("stream");
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .expect("batches");
    Ok((ingested, schema, batches))
}

#[test]
fn places_are_detected_from_the_headers_given_or_turned_off() {
    let csv = "website,company_name,Billing Country,Region,industry,country,state\n\
               acme.com,Acme,DE,EMEA,software,DE,1\n\
               ,Globex,de ,emea,retail,DE,2\n\
               ,Initech,,APAC,retail,,3\n";
    let names = |places: Places, context: &[&str]| KeySpec {
        column: Some("website".into()),
        name_column: Some("company_name".into()),
        name_context: context.iter().map(|c| c.to_string()).collect(),
        places,
        ..KeySpec::default()
    };
    let (ingested, schema, batches) = sealed_csv(csv, &names(Places::Detect, &[])).expect("ok");
    // One column per kind, the first; text columns only (`state` holds numbers here).
    assert_eq!(ingested.places, ["Billing Country", "Region"]);
    let field = schema.field_with_name(PLACE_KEY).expect("place column");
    assert_eq!(
        field.metadata().get(PLACE_KINDS).map(String::as_str),
        Some("country,region")
    );
    let places = batches[0]
        .column(schema.index_of(PLACE_KEY).expect("index"))
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("text")
        .iter()
        .map(|v| v.map(str::to_string))
        .collect::<Vec<_>>();
    // Compared like names; a row with a place value missing has no known place.
    assert_eq!(
        places,
        [
            Some("de\u{1f}emea".into()),
            Some("de\u{1f}emea".into()),
            None
        ]
    );
    // Given columns, of any header; `none`; name-context columns instead: no detection.
    let (i, s, _) =
        sealed_csv(csv, &names(Places::Columns(vec!["industry".into()]), &[])).expect("ok");
    assert_eq!(i.places, ["industry"]);
    assert_eq!(
        s.field_with_name(PLACE_KEY).expect("place").metadata()[PLACE_KINDS],
        "industry"
    );
    for (places, context) in [(Places::None, &[][..]), (Places::Detect, &["Region"][..])] {
        let (i, s, _) = sealed_csv(csv, &names(places, context)).expect("ok");
        assert!(i.places.is_empty());
        assert!(s.field_with_name(PLACE_KEY).is_err());
    }
    // Without a name column nothing is detected, and naming places is an error.
    let bare = KeySpec {
        column: Some("website".into()),
        ..KeySpec::default()
    };
    assert!(sealed_csv(csv, &bare).expect("ok").0.places.is_empty());
    for bad in [
        KeySpec {
            places: Places::Columns(vec!["Region".into()]),
            ..bare.clone()
        },
        names(Places::Columns(vec!["nosuch".into()]), &[]),
        names(Places::Columns(vec!["company_name".into()]), &[]),
        names(Places::Columns(vec!["state".into()]), &[]),
        names(
            Places::Columns(vec!["country".into(), "Billing Country".into()]),
            &[],
        ),
    ] {
        let e = sealed_csv(csv, &bad).expect_err("refused");
        assert_eq!(e.code(), "invalid_places", "{e}");
    }
    assert_eq!(Places::parse(None), Places::Detect);
    assert_eq!(Places::parse(Some(" none ")), Places::None);
    assert_eq!(
        Places::parse(Some("country, region")),
        Places::Columns(vec!["country".into(), "region".into()])
    );
}

#[test]
fn ids_given_at_upload_are_sealed_beside_their_texts() {
    use crate::matching::{ID_CHECK, KEY_ID, NAME_ID, PLACE_ID, StoredIds};
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    // A stand-in for the query engine's keyed hash: the text's length (nulls stay null).
    let hash: crate::matching::ColumnFn = Arc::new(|a: &dyn Array| {
        let text = a.as_string::<i32>();
        Ok(Arc::new(arrow_array::UInt64Array::from_iter(
            text.iter().map(|v| v.map(|v| v.len() as u64)),
        )) as arrow_array::ArrayRef)
    });
    let csv =
        "website,company_name,region\nacme.com,Acme,EMEA\n,Globex Corporation,NA\nnot a site,,\n";
    let key = |ids: Option<StoredIds>| KeySpec {
        column: Some("website".into()),
        name_column: Some("company_name".into()),
        ids,
        ..KeySpec::default()
    };
    let ids = StoredIds { hash, check: 42 };
    let (_, schema, batches) = sealed_csv(csv, &key(Some(ids))).expect("ok");
    for (id, text) in [
        (KEY_ID, COMPANY_KEY),
        (NAME_ID, NAME_KEY),
        (PLACE_ID, PLACE_KEY),
    ] {
        let field = schema.field_with_name(id).expect("an id column");
        assert_eq!(
            field.metadata().get(ID_CHECK).map(String::as_str),
            Some("42")
        );
        let (ids, texts) = (
            batches[0]
                .column_by_name(id)
                .expect("ids")
                .as_primitive::<UInt64Type>()
                .clone(),
            batches[0]
                .column_by_name(text)
                .expect("texts")
                .as_string::<i32>()
                .clone(),
        );
        let expected: Vec<Option<u64>> = texts.iter().map(|t| t.map(|t| t.len() as u64)).collect();
        assert_eq!(ids.iter().collect::<Vec<_>>(), expected, "{id}");
    }
    // Without the hash, no id columns; without a key column, none either.
    let (_, schema, _) = sealed_csv(csv, &key(None)).expect("ok");
    assert!(schema.field_with_name(KEY_ID).is_err());
}
