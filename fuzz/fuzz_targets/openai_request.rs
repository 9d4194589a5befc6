#![no_main]
libfuzzer_sys::fuzz_target!(init: bitnet_fuzzing::warm_up("openai_request"), |data: &[u8]| bitnet_fuzzing::openai_request(data));
