//! A local HTTP receiver standing in for Slack or GitHub: it records every request (path,
//! headers, JSON body, when it arrived) and answers as a script says — a status and body, or
//! no answer at all (a hang, bounded at a minute).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::Value;

pub enum Reply {
    Status(u16, Value),
    Hang,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Value,
    pub at: Instant,
}

type Script = Box<dyn FnMut(usize, &Recorded) -> Reply + Send>;

struct Inner {
    requests: Vec<Recorded>,
    answered: usize,
    script: Script,
}

#[derive(Clone)]
pub struct Recorder {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl Recorder {
    /// Listens on 127.0.0.1 (a free port); `script(n, request)` answers the n-th request (0-based).
    pub async fn start(script: impl FnMut(usize, &Recorded) -> Reply + Send + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            requests: Vec::new(),
            answered: 0,
            script: Box::new(script),
        }));
        let router = Router::new().fallback(record).with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { url, inner }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// How many requests got an answer.
    pub fn answered(&self) -> usize {
        self.inner.lock().unwrap().answered
    }

    /// Waits until `n` requests arrived (at most `within`); returns them all.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + within;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} requests arrived in {within:?}: {:#?}",
                requests.len(),
                requests
                    .iter()
                    .map(|r| (&r.path, &r.body))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn record(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    let reply = {
        let mut inner = inner.lock().unwrap();
        let n = inner.requests.len();
        let reply = (inner.script)(n, &recorded);
        inner.requests.push(recorded);
        reply
    };
    match reply {
        Reply::Status(status, body) => {
            inner.lock().unwrap().answered += 1;
            (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
        }
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}
