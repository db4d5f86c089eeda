//! Untrusted bytes from the uevent netlink socket: parsing never panics, and whatever parses has an
//! action, a devpath and a subsystem, and names a disk only when it is a block device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_agent::blockdev::{parse_uevent, UeventAction, MAX_UEVENT_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(ev) = parse_uevent(data) else { return };
    assert!(data.len() <= MAX_UEVENT_LEN);
    assert!(!data.starts_with(b"libudev\0"));
    assert!(!ev.devpath.is_empty() && !ev.subsystem.is_empty());
    assert_ne!(ev.action, UeventAction::Other(String::new()));
    if let Some(name) = ev.block_disk() {
        assert_eq!(ev.subsystem, "block");
        assert_eq!(ev.devtype.as_deref(), Some("disk"));
        assert!(!name.is_empty());
    }
});
