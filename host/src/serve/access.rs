//! Who may call what: the bearer keys each route needs, decided by a pure function of the path,
//! the configured keys and whether the daemon listens on loopback only.

use crate::config::ServerSection;

/// The keys a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No key.
    Open,
    /// A user or admin key (the inference API, once user keys are configured).
    User,
    /// An admin key (the admin API, once any key is configured).
    Admin,
    /// A metrics or admin key (`/metrics` off loopback, or once any key is configured).
    Metrics,
}

/// vLLM's token routes, outside `/v1/` yet served by the models as the API is.
const TOKENS: [&str; 3] = ["/tokenize", "/detokenize", "/tokenizer_info"];

/// What `path` needs under `server`'s keys; `loopback`: the daemon listens on a loopback
/// address only, where `/metrics` and the admin API stay open unless any key is configured (off
/// loopback both need a key: a published port must not let anyone unload the models).
pub fn need(path: &str, server: &ServerSection, loopback: bool) -> Need {
    // Keys of any kind say the daemon is shared (a proxy on the same host forwards from
    // loopback): what loopback leaves open then closes.
    let no_keys = [&server.api_keys, &server.admin_keys, &server.metrics_keys]
        .iter()
        .all(|k| k.is_empty());
    if path.starts_with("/v1/plugins") {
        if no_keys && loopback {
            Need::Open
        } else {
            Need::Admin
        }
    } else if path == "/metrics" {
        if no_keys && loopback {
            Need::Open
        } else {
            Need::Metrics
        }
    } else if (path.starts_with("/v1/") || TOKENS.contains(&path)) && !server.api_keys.is_empty() {
        Need::User
    } else {
        Need::Open
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No key, or one this server does not know (401).
    Unauthenticated(String),
    /// A key this server knows, of a kind that does not open this path (403).
    Forbidden(String),
}

impl Refusal {
    /// `message` for a request whose key is `known` to this server (403) or not (401).
    fn for_key(known: bool, message: String) -> Self {
        match known {
            true => Self::Forbidden(message),
            false => Self::Unauthenticated(message),
        }
    }

    /// The message the client gets (naming what to do).
    pub fn message(&self) -> &str {
        match self {
            Self::Unauthenticated(m) | Self::Forbidden(m) => m,
        }
    }
}

/// Whether `given` satisfies `need`; otherwise why not, in words naming what to do.
pub fn check(need: Need, given: Option<&str>, server: &ServerSection) -> Result<(), Refusal> {
    let keys: Vec<&String> = match need {
        Need::Open => return Ok(()),
        Need::User => server.api_keys.iter().chain(&server.admin_keys).collect(),
        Need::Admin => server.admin_keys.iter().collect(),
        Need::Metrics => server
            .metrics_keys
            .iter()
            .chain(&server.admin_keys)
            .collect(),
    };
    let known = |given: &str| known_key(given, server);
    if need == Need::Metrics && keys.is_empty() {
        let message = "/metrics is open only when the daemon listens on loopback; set server.metrics_keys (or admin keys) and scrape with `Authorization: Bearer KEY`".to_string();
        return Err(Refusal::for_key(given.is_some_and(known), message));
    }
    if need == Need::Admin && keys.is_empty() {
        let message = "the admin API (/v1/plugins) is open only when the daemon listens on loopback and has no keys; set server.admin_keys and call it with `Authorization: Bearer KEY`".to_string();
        return Err(Refusal::for_key(given.is_some_and(known), message));
    }
    let Some(given) = given else {
        let message = "this server needs an API key: send `Authorization: Bearer KEY`";
        return Err(Refusal::Unauthenticated(message.into()));
    };
    if keys.iter().any(|k| same(k, given)) {
        return Ok(());
    }
    let what = match need {
        Need::Admin => "an admin key (server.admin_keys)",
        Need::Metrics => "a metrics key (server.metrics_keys) or an admin key",
        _ => "a key from server.api_keys",
    };
    let message = format!("the API key is not valid here: this path needs {what}");
    Err(Refusal::for_key(known(given), message))
}

/// Whether `given` is one of the keys `server` knows, of any kind.
pub fn known_key(given: &str, server: &ServerSection) -> bool {
    (server.api_keys.iter())
        .chain(&server.admin_keys)
        .chain(&server.metrics_keys)
        .any(|k| same(k, given))
}

/// The key in an `Authorization` value: its scheme is `Bearer` in any case (RFC 7235 makes
/// schemes case-insensitive; some clients send `bearer`), the key after any whitespace.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim_start().split_once([' ', '\t'])?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Constant-time comparison, so a key cannot be guessed byte by byte from response times.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Why a request without a key is refused as one a web page elsewhere could have made a
/// browser send, if it is: its `Host` not this server's on a daemon listening on loopback (DNS
/// rebinding: a page whose name now resolves to 127.0.0.1 is same-origin with the daemon), or,
/// for a request that may change something (any method but GET, HEAD and OPTIONS), an `Origin`
/// other than the server's (a cross-site form or `fetch`, which needs no preflight). A request
/// with a key the server knows cannot be forged so (a page after DNS rebinding may send any
/// header, but knows no key); `/health` and `/ready` tell a page nothing and are not checked.
pub fn cross_site(
    path: &str,
    method: &axum::http::Method,
    host: Option<&str>,
    origin: Option<&str>,
    loopback: bool,
    allowed: &[String],
) -> Option<String> {
    let name = |authority: &str| {
        let authority = authority.trim().to_ascii_lowercase();
        let name = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.split(':').next().unwrap_or_default(),
        };
        // A fully qualified name's root dot (`localhost.`) names the same host.
        name.strip_suffix('.').unwrap_or(name).to_string()
    };
    if matches!(path, "/health" | "/ready") {
        return None;
    }
    let ours = |n: &str| allowed.iter().any(|a| a.eq_ignore_ascii_case(n));
    if let (true, Some(host)) = (loopback, host) {
        let n = name(host);
        let local = n == "localhost"
            || n.ends_with(".localhost")
            || n.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !local && !ours(&n) {
            return Some(format!(
                "Host `{host}` is not this server's: listening on loopback, it answers requests without a key only for localhost and loopback addresses (a web page could otherwise reach it by DNS rebinding); name it in server.allowed_hosts if a proxy forwards it, or send a key"
            ));
        }
    }
    let safe = matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS");
    let origin = origin.filter(|_| !safe)?;
    let from = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    let same = host.is_some_and(|h| from.eq_ignore_ascii_case(h.trim()));
    (!same && !ours(&name(from))).then(|| {
        format!(
            "a cross-site request: it comes from a page at {origin}, not this server ({}); a browser sends one for any page that asks, so it is refused without a key (name the page's host in server.allowed_hosts to allow it)",
            host.unwrap_or("no Host")
        )
    })
}

#[cfg(test)]
mod tests {
    /// On loopback, a request without a key is answered for local names alone (DNS rebinding),
    /// and one that may change something only from this server's own pages (CSRF); the proxy's
    /// name in `allowed_hosts` is let through both.
    #[test]
    fn requests_a_web_page_elsewhere_could_forge_are_refused() {
        use axum::http::Method;
        let (get, post) = (Method::GET, Method::POST);
        let none: &[String] = &[];
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:80",
            "app.localhost",
            "LOCALHOST",
            "localhost.:8080",
            "127.0.0.1.",
        ] {
            assert_eq!(
                cross_site("/v1/plugins", &get, Some(host), None, true, none),
                None,
                "{host}"
            );
        }
        let e = cross_site(
            "/v1/plugins",
            &get,
            Some("evil.example:8080"),
            None,
            true,
            none,
        )
        .unwrap();
        assert!(
            e.contains("DNS rebinding") && e.contains("allowed_hosts"),
            "{e}"
        );
        assert_eq!(
            cross_site("/v1/plugins", &get, Some("evil.example"), None, false, none),
            None
        );
        let proxy = ["chat.example.org".to_string()];
        assert_eq!(
            cross_site(
                "/v1/plugins",
                &get,
                Some("chat.example.org"),
                None,
                true,
                &proxy
            ),
            None
        );
        let here = Some("127.0.0.1:8080");
        let same = Some("http://127.0.0.1:8080");
        assert_eq!(
            cross_site("/v1/plugins", &post, here, same, true, none),
            None
        );
        assert_eq!(
            cross_site(
                "/v1/plugins",
                &get,
                here,
                Some("http://evil.example"),
                true,
                none
            ),
            None
        );
        let e = cross_site(
            "/v1/plugins",
            &post,
            here,
            Some("http://evil.example"),
            true,
            none,
        )
        .unwrap();
        assert!(e.contains("cross-site"), "{e}");
        assert!(cross_site(
            "/v1/plugins",
            &post,
            Some("10.0.0.2:80"),
            Some("null"),
            false,
            none
        )
        .is_some());
        let proxied = Some("https://chat.example.org");
        assert_eq!(
            cross_site("/v1/plugins", &post, here, proxied, true, &proxy),
            None
        );
        assert_eq!(
            cross_site("/v1/plugins", &post, here, None, true, none),
            None,
            "not from a browser"
        );
        let rebound = Some("evil.example");
        assert_eq!(cross_site("/health", &get, rebound, None, true, none), None);
    }

    use super::*;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        for value in ["Bearer k1", "bearer k1", "BEARER  k1 ", " Bearer\tk1"] {
            assert_eq!(bearer_token(value), Some("k1"), "{value:?}");
        }
        assert_eq!(bearer_token("Basic k1"), None);
        assert_eq!(bearer_token("Bearerk1"), None);
        assert_eq!(bearer_token("k1"), None);
    }

    fn server(api: &[&str], admin: &[&str], metrics: &[&str]) -> ServerSection {
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect();
        ServerSection {
            api_keys: keys(api),
            admin_keys: keys(admin),
            metrics_keys: keys(metrics),
            ..ServerSection::default()
        }
    }

    #[test]
    fn metrics_are_open_only_on_loopback_without_metrics_keys() {
        let none = server(&[], &[], &[]);
        assert_eq!(need("/metrics", &none, true), Need::Open);
        assert_eq!(need("/metrics", &none, false), Need::Metrics);
        let e = check(Need::Metrics, None, &none).unwrap_err();
        assert!(e.message().contains("server.metrics_keys"), "{e:?}");
        let users_only = server(&["user"], &[], &[]);
        let e = check(Need::Metrics, Some("user"), &users_only).unwrap_err();
        assert!(matches!(e, Refusal::Forbidden(_)), "a known key: {e:?}");
        let keyed = server(&[], &["root"], &["scrape"]);
        assert_eq!(need("/metrics", &keyed, true), Need::Metrics);
        assert!(check(Need::Metrics, Some("scrape"), &keyed).is_ok());
        assert!(check(Need::Metrics, Some("root"), &keyed).is_ok());
        assert!(matches!(
            check(Need::Metrics, Some("user"), &keyed),
            Err(Refusal::Unauthenticated(_))
        ));
    }

    #[test]
    fn user_keys_never_open_the_admin_api() {
        let s = server(&["user"], &["root"], &[]);
        assert_eq!(need("/v1/chat/completions", &s, true), Need::User);
        assert_eq!(need("/tokenize", &s, true), Need::User);
        assert_eq!(need("/detokenize", &s, false), Need::User);
        assert_eq!(need("/tokenizer_info", &s, false), Need::User);
        assert_eq!(need("/v1/plugins/echo/reload", &s, true), Need::Admin);
        assert_eq!(need("/health", &s, false), Need::Open);
        assert!(check(Need::User, Some("user"), &s).is_ok());
        assert!(check(Need::User, Some("root"), &s).is_ok());
        // A key the server knows but that does not open the path: forbidden, not unknown.
        let e = check(Need::Admin, Some("user"), &s).unwrap_err();
        assert!(
            matches!(&e, Refusal::Forbidden(m) if m.contains("admin key")),
            "{e:?}"
        );
        let e = check(Need::Admin, Some("guess"), &s).unwrap_err();
        assert!(matches!(e, Refusal::Unauthenticated(_)), "{e:?}");
        let e = check(Need::User, None, &s).unwrap_err();
        assert!(
            matches!(&e, Refusal::Unauthenticated(m) if m.contains("Bearer")),
            "{e:?}"
        );
        let open = server(&[], &[], &[]);
        assert_eq!(need("/v1/plugins", &open, true), Need::Open);
        assert_eq!(need("/v1/models", &open, false), Need::Open);
    }

    /// Off loopback the admin API needs an admin key even when no key is configured at all
    /// (the message says which setting opens it).
    /// Keys of any kind say the daemon is shared: a proxy on the same host forwards to loopback.
    #[test]
    fn metrics_keys_alone_close_the_admin_api() {
        let s = server(&[], &[], &["m"]);
        assert_eq!(need("/v1/plugins/echo/unload", &s, true), Need::Admin);
        assert_eq!(need("/v1/chat/completions", &s, true), Need::Open);
    }

    #[test]
    fn the_admin_api_is_closed_off_loopback_without_admin_keys() {
        let open = server(&[], &[], &[]);
        assert_eq!(need("/v1/plugins/echo/unload", &open, false), Need::Admin);
        let e = check(Need::Admin, None, &open).unwrap_err();
        assert!(
            matches!(&e, Refusal::Unauthenticated(m) if m.contains("server.admin_keys") && m.contains("loopback")),
            "{e:?}"
        );
        let keyed = server(&[], &["root"], &[]);
        assert_eq!(need("/v1/plugins", &keyed, false), Need::Admin);
        assert!(check(Need::Admin, Some("root"), &keyed).is_ok());
    }
}
