//! The service built in-process with `Application::build` (no binary), spoken to by the
//! library's own typed client over real mutual TLS: what an embedder or a test gets.

use std::time::Duration;

use escrow::app::{Application, Config};
use escrow::client::{Client, UploadKey};
use escrow::datadir::DataDir;

fn csv(path: &std::path::Path, n: usize) {
    let mut s = String::from("account_id,company_name,website,status\n");
    for i in 0..n {
        s += &format!(
            "a{i},Qwertzcorp{i},https://www.qwertz{i}.example,{}\n",
            ["customer", "prospect"][i % 2]
        );
    }
    std::fs::write(path, s).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_built_in_process_serves_typed_answers_and_audits_its_life() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = DataDir::new(tmp.path().join("data"));
    escrow::admin::init(&dir, &[]).unwrap();
    let bundle = escrow::admin::add_partner(&dir, "acme", escrow::pki::DEFAULT_CERT_DAYS).unwrap();

    let app = Application::build(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::new(dir.clone())
    })
    .await
    .unwrap();
    let addr = app.local_addr();
    assert_ne!(addr.port(), 0, "port 0 is resolved to the bound port");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));

    let client = Client::new(&format!("https://localhost:{}", addr.port()), &bundle).unwrap();
    let me = client.whoami().await.unwrap();
    assert_eq!((me.partner.as_str(), me.role.as_str()), ("acme", "admin"));
    assert_eq!(me.via, escrow::wire::Via::Certificate);

    let file = tmp.path().join("accounts.csv");
    csv(&file, 40);
    let up = client
        .upload(&file, "accounts", &UploadKey::default(), None)
        .await
        .unwrap();
    assert_eq!(
        (up.dataset.as_str(), up.version, up.rows),
        ("accounts", 1, 40)
    );
    let listed = client.datasets().await.unwrap();
    assert_eq!(listed.datasets.len(), 1);
    assert_eq!(listed.datasets[0].rows, 40);
    assert!(
        listed.datasets[0]
            .columns
            .iter()
            .any(|c| c.name == "website"),
        "{:?}",
        listed.datasets[0].columns
    );

    // A refusal comes back as the one error shape, read by the client into one line.
    let err = client.delete("no_such_dataset").await.unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server stops when asked")
        .unwrap()
        .unwrap();

    // Its life is in the audit log: startup first, the upload, shutdown last.
    let records = escrow::admin::audit_list(&dir, None).unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r.event.kind.as_str()).collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k);
    assert!(at("startup") < at("upload"), "{kinds:?}");
    assert!(at("startup").is_some(), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"shutdown"), "{kinds:?}");
}
