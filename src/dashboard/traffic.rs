//! The dashboard's charts of an app's requests: the proxy's counters ([`svc::Traffic`]) sampled
//! once a minute into an in-memory history (the last hour; a server restart starts it anew),
//! and the bars an app page draws from it (requests per minute, answers by status class).
//!
//! Owns the history and the charts' geometry. Must not decide who sees it: a page shows an app's
//! chart only after the service let its user see the app.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::service::{self as svc, Caller, Service};

/// How many minutes the chart shows.
pub const MINUTES: usize = 60;

/// Each app's samples, one a minute, oldest first.
#[derive(Default)]
pub struct History {
    samples: Mutex<HashMap<String, VecDeque<svc::Traffic>>>,
}

impl History {
    fn record(&self, app: &str, traffic: svc::Traffic) {
        let mut samples = self.samples.lock().expect("history lock");
        let app = samples.entry(app.to_string()).or_default();
        if app.len() > MINUTES {
            app.pop_front();
        }
        app.push_back(traffic);
    }

    /// Forgets the apps not in `apps` (destroyed).
    fn keep_only(&self, apps: &[String]) {
        self.samples
            .lock()
            .expect("history lock")
            .retain(|name, _| apps.contains(name));
    }

    /// Requests in each of the last minutes, oldest first, the one going on (counted up to
    /// `now`) last; at most [`MINUTES`].
    pub fn per_minute(&self, app: &str, now: &svc::Traffic) -> Vec<u64> {
        let samples = self.samples.lock().expect("history lock");
        let Some(app) = samples.get(app) else {
            // Not sampled yet: it was created (or the server started) within the minute.
            return vec![now.requests];
        };
        let mut minutes: Vec<u64> = app
            .iter()
            .chain([now])
            .zip(app.iter().skip(1).chain([now]))
            .map(|(a, b)| b.requests.saturating_sub(a.requests))
            .collect();
        let past = minutes.len().saturating_sub(MINUTES);
        minutes.drain(..past);
        minutes
    }
}

/// Samples every app's counters now and then once a minute, until `shutdown`.
pub async fn sample(service: Arc<Service>, history: Arc<History>, shutdown: CancellationToken) {
    let root = Caller::root();
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Ok(apps) = service.apps(&root).await else {
            continue;
        };
        let names: Vec<String> = apps.into_iter().map(|a| a.name).collect();
        for name in &names {
            if let Ok(traffic) = service.traffic(&root, name).await {
                history.record(name, traffic);
            }
        }
        history.keep_only(&names);
    }
}

/// One bar of the requests chart, in the SVG's units (600 × 80).
#[derive(Debug, Serialize, PartialEq)]
pub struct Bar {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
    pub requests: u64,
    /// How many minutes before the one going on (0: this minute, so far).
    pub minutes_ago: usize,
}

pub const CHART_WIDTH: f64 = 600.0;
pub const CHART_HEIGHT: f64 = 80.0;

/// The bars of a requests-per-minute chart (the last minute rightmost).
pub fn bars(per_minute: &[u64]) -> Vec<Bar> {
    let max = per_minute.iter().copied().max().unwrap_or(0).max(1) as f64;
    let slot = CHART_WIDTH / MINUTES as f64;
    let first = MINUTES.saturating_sub(per_minute.len());
    per_minute
        .iter()
        .enumerate()
        .map(|(i, &requests)| {
            let height = (requests as f64 / max * CHART_HEIGHT).max(1.0);
            Bar {
                x: (first + i) as f64 * slot + 1.0,
                y: CHART_HEIGHT - height,
                width: slot - 2.0,
                height,
                requests,
                minutes_ago: per_minute.len() - 1 - i,
            }
        })
        .collect()
}

/// One part of the status-class bar.
#[derive(Debug, Serialize, PartialEq)]
pub struct Share {
    /// `2xx` …
    pub class: &'static str,
    pub count: u64,
    /// Its share of all answers, in percent.
    pub percent: f64,
}

/// The answers by status class (the classes that occurred), with their shares.
pub fn shares(traffic: &svc::Traffic) -> Vec<Share> {
    let total = traffic.requests.max(1) as f64;
    [
        ("1xx", traffic.informational),
        ("2xx", traffic.success),
        ("3xx", traffic.redirection),
        ("4xx", traffic.client_error),
        ("5xx", traffic.server_error),
    ]
    .into_iter()
    .filter(|(_, count)| *count > 0)
    .map(|(class, count)| Share {
        class,
        count,
        percent: (count as f64 / total * 1000.0).round() / 10.0,
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(requests: u64) -> svc::Traffic {
        svc::Traffic {
            requests,
            success: requests,
            ..Default::default()
        }
    }

    #[test]
    fn history_keeps_an_hour_of_minutes() {
        let history = History::default();
        assert_eq!(history.per_minute("shop", &traffic(3)), vec![3]);
        for total in [0, 10, 10, 25] {
            history.record("shop", traffic(total));
        }
        assert_eq!(history.per_minute("shop", &traffic(27)), vec![10, 0, 15, 2]);
        for i in 0..100 {
            history.record("shop", traffic(25 + i));
        }
        assert_eq!(history.per_minute("shop", &traffic(200)).len(), MINUTES);
        history.keep_only(&[]);
        assert_eq!(history.per_minute("shop", &traffic(200)), vec![200]);
    }

    #[test]
    fn bars_scale_to_the_busiest_minute() {
        let bars = bars(&[5, 10, 0]);
        assert_eq!(bars.len(), 3);
        assert_eq!(bars[1].height, CHART_HEIGHT);
        assert_eq!(bars[0].height, CHART_HEIGHT / 2.0);
        assert_eq!(bars[2].height, 1.0, "an empty minute still shows");
        assert_eq!(bars[2].minutes_ago, 0);
        assert!(bars[2].x + bars[2].width <= CHART_WIDTH);
        assert!(
            bars[0].x > bars[0].width * 50.0,
            "the newest minutes are at the right"
        );
    }

    #[test]
    fn shares_of_status_classes() {
        let t = svc::Traffic {
            requests: 4,
            success: 3,
            server_error: 1,
            ..Default::default()
        };
        let shares = shares(&t);
        assert_eq!(
            shares,
            vec![
                Share {
                    class: "2xx",
                    count: 3,
                    percent: 75.0
                },
                Share {
                    class: "5xx",
                    count: 1,
                    percent: 25.0
                }
            ]
        );
    }
}
