//! Chat template rendering with hostile messages. The input's first byte says whether to add the
//! generation prompt (its low bit); the rest, split at 0 bytes, is role, content, role, content...
//! (lossy UTF-8; an odd piece at the end is a role with empty content). The property (rendered
//! verbatim, never evaluated, never a panic) is `tpserve_modelfile::fuzzing::check_chatml_render`,
//! the same the proptest `hostile_messages_render_as_their_own_text` checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpserve_modelfile::fuzzing::check_chatml_render;
use tpserve_modelfile::ChatMessage;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let pieces: Vec<String> = rest
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let messages: Vec<ChatMessage> = pieces
        .chunks(2)
        .map(|pair| ChatMessage {
            role: pair[0].clone(),
            content: pair.get(1).cloned().unwrap_or_default(),
        })
        .collect();
    check_chatml_render(&messages, flags & 1 == 1);
});
