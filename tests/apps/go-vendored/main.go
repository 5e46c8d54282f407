package main

import (
	"fmt"
	"net/http"
	"os"
	"runtime"

	"example.com/greet"
)

func main() {
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s (%s)\n", greet.Hello(), runtime.Version())
	})
	if err := http.ListenAndServe("0.0.0.0:"+os.Getenv("PORT"), nil); err != nil {
		panic(err)
	}
}
