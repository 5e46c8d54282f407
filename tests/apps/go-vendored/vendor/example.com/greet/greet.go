// Package greet is a dependency vendored into the app (the Go module proxy is not reachable).
package greet

func Hello() string { return "hello from go" }
