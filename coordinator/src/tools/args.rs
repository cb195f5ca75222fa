//! The tool-calling flags, vLLM's names: `--enable-auto-tool-choice` and `--tool-call-parser`.

use clap::Args;
use tpserve_modelfile::chat::ChatTemplate;

use super::ParserKind;
use crate::error::StartError;

/// The tool-calling option group.
#[derive(Debug, Clone, Default, Args)]
pub struct ToolArgs {
    /// Let the model decide when to call tools (`tool_choice: "auto"`, the default when a
    /// request has tools), reading its calls with the --tool-call-parser format. Without it such
    /// requests are refused with 400, as vLLM does; `none`, `required` and named functions work
    /// either way.
    #[arg(long, env = "TPSERVE_ENABLE_AUTO_TOOL_CHOICE")]
    pub enable_auto_tool_choice: bool,
    /// The model's tool-call format: `llama3_json` (Llama 3.1+), `hermes` (Qwen2.5, Hermes) or
    /// `mistral`. Default: recognised from the chat template's markup.
    #[arg(long, env = "TPSERVE_TOOL_CALL_PARSER", value_enum)]
    pub tool_call_parser: Option<ParserKind>,
}

/// What the API does with tools.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToolConfig {
    /// `tool_choice: auto` is served.
    pub auto: bool,
    /// The format calls are read in (also the fallback of forced calls).
    pub parser: Option<ParserKind>,
}

impl ToolArgs {
    /// The flags with the chat template: `--enable-auto-tool-choice` needs a format, given or
    /// recognised.
    pub fn resolve(&self, template: Option<&ChatTemplate>) -> Result<ToolConfig, StartError> {
        let parser = self
            .tool_call_parser
            .or_else(|| template.and_then(|t| ParserKind::detect(t.source())));
        if self.enable_auto_tool_choice && parser.is_none() {
            return Err(StartError::Config {
                detail: "--enable-auto-tool-choice needs --tool-call-parser (llama3_json, hermes \
                         or mistral): the chat template shows none of their formats"
                    .into(),
            });
        }
        Ok(ToolConfig {
            auto: self.enable_auto_tool_choice,
            parser,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), None, None).unwrap()
    }

    #[test]
    fn the_parser_is_the_flag_else_the_templates_format() {
        let hermes = template("{{ '<tool_call>' }}");
        let args = ToolArgs {
            enable_auto_tool_choice: true,
            tool_call_parser: None,
        };
        assert_eq!(
            args.resolve(Some(&hermes)).unwrap(),
            ToolConfig {
                auto: true,
                parser: Some(ParserKind::Hermes)
            }
        );
        let args = ToolArgs {
            enable_auto_tool_choice: true,
            tool_call_parser: Some(ParserKind::Mistral),
        };
        assert_eq!(
            args.resolve(Some(&hermes)).unwrap().parser,
            Some(ParserKind::Mistral)
        );
    }

    #[test]
    fn auto_tool_choice_without_a_format_is_refused_at_start() {
        let args = ToolArgs {
            enable_auto_tool_choice: true,
            tool_call_parser: None,
        };
        let plain = template("{{ messages[0].content }}");
        assert!(args.resolve(Some(&plain)).is_err());
        assert!(args.resolve(None).is_err());
        assert_eq!(
            ToolArgs::default().resolve(Some(&plain)).unwrap(),
            ToolConfig::default()
        );
    }
}
