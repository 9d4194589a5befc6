//! The OpenAPI 3.1 description of the server, served at `/openapi.json`:
//! derived from the handlers' annotations and the request and response
//! types, with the error responses every endpoint shares added here.

use crate::handlers;
use crate::responses::ErrorResponse;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi as Spec, Ref, RefOr};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(title = "bitnet-rs", description = "An OpenAI-compatible server for ternary (BitNet b1.58) language models."),
    paths(
        handlers::chat_completions,
        handlers::completions,
        handlers::models,
        handlers::tokenize,
        handlers::detokenize,
        handlers::health,
        handlers::metrics,
        handlers::page,
        handlers::openapi
    ),
    components(schemas(ErrorResponse)),
    modifiers(&SharedResponses)
)]
pub struct ApiDoc;

/// The spec as served: [`ApiDoc`], with each streamed response described
/// event by event (an OpenAPI 3.2 `text/event-stream` schema, which the
/// derive cannot write): `data` holds a JSON chunk (or an error), and the
/// last event's is `[DONE]`.
pub fn spec() -> serde_json::Value {
    let mut spec = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    for (path, chunk) in [("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "TextCompletionChunk")] {
        let events = serde_json::json!({
            "type": "object",
            "required": ["data"],
            "properties": { "data": { "type": "string" } },
            "if": { "properties": { "data": { "const": "[DONE]" } } },
            "else": { "properties": { "data": {
                "contentMediaType": "application/json",
                "contentSchema": { "anyOf": [{ "$ref": format!("#/components/schemas/{chunk}") }, { "$ref": "#/components/schemas/ErrorResponse" }] },
            } } },
        });
        if let Some(content) = spec.pointer_mut(&format!("/paths/{}/post/responses/200/content/text~1event-stream", path.replace('/', "~1"))) {
            content["schema"] = events;
        }
    }
    spec
}

/// The paths that need no API key.
pub const PUBLIC: [&str; 4] = ["/", "/health", "/metrics", "/openapi.json"];

/// Adds what the handlers' annotations leave out because every endpoint
/// shares it: the error responses and the bearer key.
struct SharedResponses;

impl Modify for SharedResponses {
    fn modify(&self, spec: &mut Spec) {
        let error = |what: &str| {
            let r = ResponseBuilder::new().description(what).content("application/json", Content::new(Some(Ref::from_schema_name("ErrorResponse"))));
            RefOr::T(r.build())
        };
        let components = spec.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some("`--api-key` or `--api-key-file`")).build()),
        );
        for (path, item) in spec.paths.paths.iter_mut() {
            let public = PUBLIC.contains(&path.as_str());
            let generates = path.ends_with("completions");
            for (op, post) in [(item.get.as_mut(), false), (item.post.as_mut(), true)] {
                let Some(op) = op else { continue };
                let r = &mut op.responses.responses;
                r.entry("500".into()).or_insert_with(|| error("A fault while serving this request (the server goes on)"));
                r.entry("503".into()).or_insert_with(|| error("The model is still loading, or (with `Retry-After`) the queue is full"));
                if !public {
                    r.entry("401".into()).or_insert_with(|| error("A missing or wrong API key"));
                    op.security = Some(vec![SecurityRequirement::new("api_key", Vec::<String>::new())]);
                }
                if post {
                    r.entry("400".into()).or_insert_with(|| error("Bad JSON, wrong types or values, a prompt over the context"));
                    r.entry("413".into()).or_insert_with(|| error("The body is larger than the server accepts"));
                }
                if generates {
                    r.entry("504".into()).or_insert_with(|| error("The request ran past `--timeout`"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_names_every_endpoint_and_its_errors() {
        let spec = spec();
        assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = spec["paths"].as_object().unwrap();
        for p in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics", "/", "/openapi.json"] {
            assert!(paths.contains_key(p), "{p} missing from the spec");
        }
        let chat = &paths["/v1/chat/completions"]["post"];
        for status in ["200", "400", "401", "413", "500", "503", "504"] {
            assert!(chat["responses"].get(status).is_some(), "chat completions lacks {status}");
        }
        let events = &chat["responses"]["200"]["content"]["text/event-stream"]["schema"];
        assert_eq!(events["else"]["properties"]["data"]["contentSchema"]["anyOf"][0]["$ref"], "#/components/schemas/ChatCompletionChunk");
        assert!(paths["/health"]["get"]["responses"].get("401").is_none());
        let schemas = spec["components"]["schemas"].as_object().unwrap();
        for s in [
            "ChatRequest",
            "CompletionRequest",
            "ChatCompletion",
            "TextCompletion",
            "ErrorResponse",
            "Usage",
            "Finish",
            "ChatCompletionChunk",
            "TextCompletionChunk",
            "ResponseFormat",
        ] {
            assert!(schemas.contains_key(s), "schema {s} missing");
        }
        assert_eq!(schemas["Finish"]["enum"], serde_json::json!(["stop", "length"]));
    }
}
