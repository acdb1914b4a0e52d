//! A perfectly ordinary shared library with a C function and no kedit (or abi_stable) root
//! module: what a user gets when pointing `--plugin` at the wrong `.so`.

/// Adds two numbers.
#[no_mangle]
pub extern "C" fn test_not_a_plugin_add(a: i32, b: i32) -> i32 {
    a.wrapping_add(b)
}
