//! Checks shared by the fuzz targets.

/// A path as the index keeps it: relative, normalised.
pub fn check_path(path: &str) {
    assert!(
        !path.is_empty() && !path.starts_with('/'),
        "bad path {path:?}"
    );
    assert!(
        path.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".."),
        "path not normalised: {path:?}"
    );
}
