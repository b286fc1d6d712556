//! The control socket's request parser on arbitrary bytes: no panic, and whatever
//! it accepts re-encodes to a line it parses back to the same request.
#![no_main]
use hilrig_vmm_api::control::{parse_request, RequestError, MAX_LINE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(Some(req)) => {
            let line = req.to_line();
            assert!(line.len() <= MAX_LINE + 64, "re-encoded request grew");
            match parse_request(line.as_bytes()) {
                Ok(Some(back)) => assert_eq!(back, req),
                other => panic!("{line:?} did not parse back: {other:?}"),
            }
        }
        Ok(None) => assert!(String::from_utf8_lossy(data).trim().is_empty()),
        Err(RequestError::TooLong(n)) => assert!(n > MAX_LINE),
        Err(RequestError::Bad(_)) => {}
    }
});
