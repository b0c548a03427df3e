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
