//! The raw declarations link and call the library build.rs found.
use std::ffi::CStr;

#[test]
fn calls_the_linked_library() {
    let version = unsafe { CStr::from_ptr(moas_sys::moas_version_string()) };
    let version = version.to_str().unwrap();
    let number = unsafe { moas_sys::moas_version_number() };
    let parts: Vec<i32> = version.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts[0], 1, "{version}");
    assert_eq!(
        number,
        parts[0] * 10000 + parts[1] * 100 + parts[2],
        "{version}"
    );
    let from = moas_sys::LINKED_FROM;
    // MOAS_STATIC=1 links statically without the feature
    let kind = if cfg!(feature = "static") {
        "static: /"
    } else {
        ": /"
    };
    assert!(from.contains(kind), "{from}");
}
