//! `tollgate check-config`: every preset passes; every broken file fails with
//! exactly the expected `file:line:column: message` lines.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs check-config from the crate directory on a relative path, so messages
/// name the file as the user typed it.
fn check(rel: &str) -> (i32, String, String) {
    let out = tollgate()
        .arg("check-config")
        .arg(rel)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tollgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_preset_is_valid() {
    let dir = repo().join("examples/policies");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/policies exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stdout, stderr) = check(path.to_str().expect("utf-8 path"));
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains(": ok"), "{stdout}");
            n += 1;
        }
    }
    assert_eq!(n, 5, "five presets");
}

#[test]
fn broken_files_report_every_problem_with_line_and_column() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/broken");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/broken exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .expect("file name");
        let rel = format!("tests/broken/{name}");
        let (code, stdout, stderr) = check(&rel);
        assert_eq!(code, 1, "{rel} must be refused; stdout: {stdout}");
        let expected_path = path.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} missing; got:\n{stderr}", expected_path.display()));
        assert_eq!(stderr.trim_end(), expected.trim_end(), "messages for {rel}");
        n += 1;
    }
    assert!(n >= 7, "at least seven broken files, found {n}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, _, stderr) = check("no/such/policy.toml");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no/such/policy.toml: cannot read the policy file"),
        "{stderr}"
    );
}

#[test]
fn help_and_version() {
    let out = tollgate().arg("--help").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    let out = tollgate().arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tollgate "));
    let out = tollgate().arg("no-such-command").output().expect("run");
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

/// A CA certificate (public, no key kept) for the `upstream_ca_file` checks.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBpzCCAU2gAwIBAgIUS7KLU671f/BBDpco3hxfFESh4fowCgYIKoZIzj0EAwIw
KDEmMCQGA1UEAwwddG9sbGdhdGUgY2hlY2stY29uZmlnIHRlc3QgQ0EwIBcNMjYx
MTI0MTkxNDIwWhgPMjEyNjEwMzExOTE0MjBaMCgxJjAkBgNVBAMMHXRvbGxnYXRl
IGNoZWNrLWNvbmZpZyB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE
v2+XMUwR0+07CgL5HTaoWxnW2T/kCtH9nIGl8VpNfjMwGTvV4dBEPk9YaLu63cfG
VDm/9iyDrtA1BvImUh1nZ6NTMFEwHQYDVR0OBBYEFNXbFH/Xztf+PU/AyUbwxNzb
7MUMMB8GA1UdIwQYMBaAFNXbFH/Xztf+PU/AyUbwxNzb7MUMMA8GA1UdEwEB/wQF
MAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIhAOpGMItYJfR4REDZzap2ZPiZAn+MbIcX
1HLj+kNX8+wFAiBV/9seIhBrQHfxoMOdFUdQSDcuwlQwHJkG9pZLasqhOA==
-----END CERTIFICATE-----
";

/// check-config on the default policy with `server` as its `[server]`
/// section, written in `dir`: exit code and stderr.
fn check_server(dir: &tempfile::TempDir, server: &str) -> (i32, String) {
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n[server]\n{server}\n",
            tollgate_server::config::DEFAULT_POLICY
        ),
    )
    .expect("write policy");
    let (code, _, stderr) = check(path.to_str().expect("utf-8 path"));
    (code, stderr)
}

#[test]
fn upstream_may_be_https_with_a_ca_file_and_nothing_else() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, CA_PEM).expect("write CA");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let missing = dir.path().join("missing.pem");

    for ok in [
        r#"upstream = "https://api.example.com""#.to_owned(),
        r#"upstream = "https://127.0.0.1:8443/v1""#.to_owned(),
        format!(
            "upstream = \"https://api.internal\"\nupstream_ca_file = \"{}\"",
            ca.display()
        ),
        r#"upstream = "http://127.0.0.1:9000""#.to_owned(),
    ] {
        let (code, stderr) = check_server(&dir, &ok);
        assert_eq!(code, 0, "{ok}: {stderr}");
    }

    let (code, stderr) = check_server(&dir, r#"upstream = "ftp://files.example.com""#);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            r#"[server] upstream = "ftp://files.example.com" must be an http:// or https:// URL such as"#
        ),
        "{stderr}"
    );

    for (path, why) in [
        (&missing, "cannot be read"),
        (&garbage, "holds no certificate"),
    ] {
        let (code, stderr) = check_server(
            &dir,
            &format!(
                "upstream = \"https://api.internal\"\nupstream_ca_file = \"{}\"",
                path.display()
            ),
        );
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!(
                "[server] upstream_ca_file = \"{}\": {why}",
                path.display()
            )),
            "{stderr}"
        );
    }
}

#[test]
fn serve_refuses_an_upstream_flag_of_another_scheme() {
    let dir = tempfile::tempdir().expect("dir");
    let out = tollgate()
        .args(["serve", "--upstream", "ftp://files.example.com"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run tollgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("must be an http:// or https:// URL"),
        "{stderr}"
    );
}
