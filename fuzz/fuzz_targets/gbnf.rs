#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitnet_fuzzing::gbnf(data));
