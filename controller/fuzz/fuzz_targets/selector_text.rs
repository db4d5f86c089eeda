//! `shoal_controller_core::fuzzing::selector_text`: see that module for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = shoal_controller_core::fuzzing::selector_text(data);
});
