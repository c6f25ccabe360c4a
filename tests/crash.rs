//! kill -9 of the server in the middle of an upload, then restart: no partial version is
//! visible and the orphaned temp file is removed.

use std::time::{Duration, Instant};

use crate::harness::{BIN, Env, accounts_csv};

#[test]
fn kill9_mid_upload_leaves_nothing() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    let ok = env.file("ok.csv", accounts_csv(100, "ok").as_bytes());
    env.upload(&server, "acme", &ok, "kept", &[]).ok();

    // a large upload in the background
    let big = env.file("big.csv", accounts_csv(400_000, "crash").as_bytes());
    let mut upload = std::process::Command::new(BIN)
        .args(["upload", big.to_str().expect("p"), "--dataset", "partial"])
        .env("ESCROW_IDENTITY", env.bundle("acme"))
        .env("ESCROW_SERVER", &server.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("upload");
    // wait until the server is writing the sealed temp file
    let tmp = env.data.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let writing = std::fs::read_dir(&tmp)
            .expect("tmp")
            .flatten()
            .any(|e| e.metadata().is_ok_and(|m| m.len() > 0));
        if writing {
            break;
        }
        assert!(Instant::now() < deadline, "upload never started writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill9();
    let _ = upload.wait();
    assert!(
        std::fs::read_dir(&tmp).expect("tmp").next().is_some(),
        "the crash should leave a partial file"
    );

    let server = env.serve(&[]);
    server.wait_log("partial_uploads_removed=1");
    let list = env.datasets(&server, "acme");
    let names: Vec<&str> = list["datasets"]
        .as_array()
        .expect("a")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, vec!["kept"], "no partial dataset may be listed");
    assert!(
        std::fs::read_dir(&tmp).expect("tmp").next().is_none(),
        "orphans must be gone"
    );
    assert_eq!(env.sealed_files().len(), 1);
    // an orphan sealed file (crash between rename and catalog commit) is removed too
    let kept_dir = env.sealed_files()[0].parent().expect("dir").to_path_buf();
    std::fs::write(
        kept_dir.join("00000000000000000000000000000000.sealed"),
        b"orphan",
    )
    .expect("orphan");
    drop(server);
    let server = env.serve(&[]);
    server.wait_log("orphan_files_removed=1");
    assert_eq!(env.sealed_files().len(), 1);
    env.upload(&server, "acme", &big, "partial", &[]).ok();
}
