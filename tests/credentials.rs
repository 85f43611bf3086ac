//! End-to-end: which credential combinations the cache serves (SPEC §4). A token alone, or with
//! `Authorization: Bearer <the same token>` (what `@figuro/chatwoot-sdk` sends), is scoped and
//! cached by the token; any other companion (devise headers, another `Authorization`) mixes
//! identities in Chatwoot and is passed through, never stored, never answered from the cache.

mod support;

use http::Method;
use support::*;

const ADMIN: &str = "admin-token";
const DEVISE_TOKEN: &str = "devise-access-token";
const DEVISE_UID: &str = "dana@example.com";

/// Headers beside the token, and who Chatwoot answers as: a viewer name, or a status.
type Combo<'a> = (Vec<(&'a str, &'a str)>, Result<&'a str, u16>);

fn conv_path(c: u64) -> String {
    format!("/api/v1/accounts/1/conversations/{c}")
}

async fn get_with(proxy: &ProxyHandle, c: u64, headers: &[(&str, &str)]) -> Resp {
    send(Method::GET, &proxy.url(&conv_path(c)), headers, b"").await
}

fn viewer(r: &Resp) -> String {
    r.json()["custom_attributes"]["viewer"]
        .as_str()
        .unwrap_or_else(|| panic!("no viewer in {}", r.text()))
        .to_string()
}

/// The SDK's pair (token header + `Authorization: Bearer <same token>`) is a MISS, then a HIT,
/// sharing its entry with token-only requests of that token; both headers reach Chatwoot
/// unchanged and no request header is replayed on a hit.
#[tokio::test]
async fn a_token_with_a_bearer_of_itself_is_cached() {
    let (fake, proxy) = setup().await;
    let bearer = format!("Bearer {ADMIN}");
    let sdk = [
        ("api_access_token", ADMIN),
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let miss = get_with(&proxy, 42, &sdk).await;
    assert_eq!((miss.status.as_u16(), miss.x_cache()), (200, "MISS"));
    assert_eq!(viewer(&miss), "admin");
    let seen = fake.last_seen();
    assert_eq!(seen.headers["authorization"], bearer.as_str());
    assert_eq!(seen.headers["api_access_token"], ADMIN);

    let hit = get_with(&proxy, 42, &sdk).await;
    assert_eq!((hit.status.as_u16(), hit.x_cache()), (200, "HIT"));
    assert_eq!(hit.body, miss.body);
    assert!(hit.headers.get("authorization").is_none());
    assert!(hit.headers.get("api_access_token").is_none());
    // One scope: the token alone is served the same entry, and the other way round.
    let alone = get_with(&proxy, 42, &[("api_access_token", ADMIN)]).await;
    assert_eq!(alone.x_cache(), "HIT");
    assert_eq!(fake.show_requests(), 1);

    // A token the upstream refuses is refused the same way with its bearer twin.
    let bad = [
        ("api_access_token", "no-such-token"),
        ("authorization", "Bearer no-such-token"),
    ];
    let r = get_with(&proxy, 42, &bad).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "MISS"));
    let r = get_with(&proxy, 42, &bad).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "LOCAL"));
    assert_eq!(r.json()["errors"][0]["code"], "invalid_token");
}

/// A token beside any other credential is `BYPASS` in both directions: the mixed answer is
/// never stored (the token alone still misses and gets its own view) and a stored token entry is
/// never served to the mixed request (it reaches Chatwoot, which answers as the devise user).
#[tokio::test]
async fn a_token_mixed_with_other_credentials_is_never_cached() {
    let (fake, proxy) = setup().await;
    fake.add_devise_user(DEVISE_TOKEN, DEVISE_UID, "dana", None);
    // A second devise user who is no member: a mixed request gets her 401, which must not
    // become the token's negative entry either.
    fake.add_devise_user("eve-access-token", "eve@example.com", "eve", Some(&[]));
    let devise_bearer = format!("Bearer {DEVISE_TOKEN}");
    let own_bearer = format!("Bearer {ADMIN}");
    let combos: Vec<Combo> = vec![
        (vec![("authorization", devise_bearer.as_str())], Ok("dana")),
        (
            vec![
                ("access-token", DEVISE_TOKEN),
                ("client", "web"),
                ("uid", DEVISE_UID),
            ],
            Ok("dana"),
        ),
        // devise's `client` defaults to "default": two headers are a session too.
        (
            vec![("access-token", DEVISE_TOKEN), ("uid", DEVISE_UID)],
            Ok("dana"),
        ),
        (
            vec![
                ("authorization", own_bearer.as_str()),
                ("access-token", DEVISE_TOKEN),
                ("uid", DEVISE_UID),
            ],
            Ok("dana"),
        ),
        (
            vec![
                ("access-token", "eve-access-token"),
                ("uid", "eve@example.com"),
            ],
            Err(401),
        ),
        // Values devise cannot read: Chatwoot would answer as the token, but SPEC keeps every
        // combination other than the exact bearer twin out of the cache.
        (
            vec![("authorization", "Bearer something-else")],
            Ok("admin"),
        ),
        (vec![("authorization", "bearer admin-token")], Ok("admin")),
        (vec![("uid", DEVISE_UID)], Ok("admin")),
    ];
    for (i, (extra, answer)) in combos.iter().enumerate() {
        let c = 100 + i as u64;
        fake.add_conversation(1, c, "1765182000.482917");
        let mut mixed = vec![("api_access_token", ADMIN)];
        mixed.extend_from_slice(extra);
        let check = |r: &Resp, what: &str| {
            assert_eq!(r.x_cache(), "BYPASS", "{what} {extra:?}");
            match answer {
                Ok(name) => {
                    assert_eq!(r.status, 200, "{what} {extra:?}");
                    assert_eq!(viewer(r), *name, "{what} {extra:?}");
                }
                Err(status) => assert_eq!(r.status.as_u16(), *status, "{what} {extra:?}"),
            }
        };
        let before = fake.show_requests();

        // Mixed first: passed through, twice, and not stored for the token.
        check(&get_with(&proxy, c, &mixed).await, "first mixed");
        check(&get_with(&proxy, c, &mixed).await, "second mixed");
        let own = get_with(&proxy, c, &[("api_access_token", ADMIN)]).await;
        assert_eq!(
            (own.status.as_u16(), own.x_cache()),
            (200, "MISS"),
            "{extra:?}: token alone after mixed"
        );
        assert_eq!(viewer(&own), "admin");
        let own = get_with(&proxy, c, &[("api_access_token", ADMIN)]).await;
        assert_eq!(own.x_cache(), "HIT");

        // Token stored first: the mixed request still reaches Chatwoot.
        check(&get_with(&proxy, c, &mixed).await, "mixed after stored");
        assert_eq!(
            fake.show_requests() - before,
            4,
            "{extra:?}: every mixed request and the one miss reach Chatwoot"
        );
        // And the stored entry is still the token's own.
        let own = get_with(&proxy, c, &[("api_access_token", ADMIN)]).await;
        assert_eq!((own.x_cache(), viewer(&own).as_str()), ("HIT", "admin"));
    }
}

/// devise-only and `Authorization`-only requests are passed through, never cached; a lone
/// devise header is no session, so the proxy refuses it as a missing token.
#[tokio::test]
async fn devise_only_and_authorization_only_stay_bypass() {
    let (fake, proxy) = setup().await;
    fake.add_devise_user(DEVISE_TOKEN, DEVISE_UID, "dana", None);
    let bearer = format!("Bearer {DEVISE_TOKEN}");
    for headers in [
        vec![("authorization", bearer.as_str())],
        vec![
            ("access-token", DEVISE_TOKEN),
            ("client", "web"),
            ("uid", DEVISE_UID),
        ],
        vec![("access-token", DEVISE_TOKEN), ("uid", DEVISE_UID)],
        // An empty token header is no token to Rails: devise decides.
        vec![("api_access_token", ""), ("authorization", bearer.as_str())],
    ] {
        let before = fake.show_requests();
        for _ in 0..2 {
            let r = get_with(&proxy, 42, &headers).await;
            assert_eq!(
                (r.status.as_u16(), r.x_cache()),
                (200, "BYPASS"),
                "{headers:?}"
            );
            assert_eq!(viewer(&r), "dana");
        }
        assert_eq!(fake.show_requests() - before, 2, "{headers:?}");
    }
    let r = get_with(&proxy, 42, &[("access-token", DEVISE_TOKEN)]).await;
    assert_eq!((r.status.as_u16(), r.x_cache()), (401, "LOCAL"));
    assert_eq!(r.json()["errors"][0]["code"], "missing_token");
}
