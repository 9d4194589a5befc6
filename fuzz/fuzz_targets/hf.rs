#![no_main]
libfuzzer_sys::fuzz_target!(init: bitnet_fuzzing::warm_up("hf"), |data: &[u8]| bitnet_fuzzing::hf(data));
