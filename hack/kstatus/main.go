// Command kstatus prints what sigs.k8s.io/cli-utils/pkg/kstatus computes for Kubernetes objects: the reading
// (Current, InProgress, Failed, ...) that Flux, and the tools built on kstatus, give a custom resource's status.
//
// Input on stdin: JSON objects, one after another (one per line, say), or JSON lists of them. Output on stdout:
// one JSON line per object, in order: {"kind", "name", "status", "message"}, or {"kind", "name", "error"} when
// kstatus cannot compute a reading. `kstatus --version` names the cli-utils version it was built with.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// source is stamped by hack/build-kstatus.sh (a digest of this module's files), so a changed program is rebuilt.
var source = "dev"

type reading struct {
	Kind    string `json:"kind,omitempty"`
	Name    string `json:"name,omitempty"`
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	version := flag.Bool("version", false, "print the kstatus (cli-utils) version and exit")
	flag.Parse()
	if *version {
		fmt.Printf("kstatus sigs.k8s.io/cli-utils %s (source %s)\n", cliUtilsVersion(), source)
		return
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func cliUtilsVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "sigs.k8s.io/cli-utils" {
				return dep.Version
			}
		}
	}
	return "unknown"
}

func run(in io.Reader, out io.Writer) error {
	dec := json.NewDecoder(bufio.NewReader(in))
	w := bufio.NewWriter(out)
	defer w.Flush()
	enc := json.NewEncoder(w)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("reading JSON: %w", err)
		}
		items := []json.RawMessage{raw}
		if trimmed := bytes.TrimSpace(raw); len(trimmed) > 0 && trimmed[0] == '[' {
			items = nil
			if err := json.Unmarshal(trimmed, &items); err != nil {
				return fmt.Errorf("reading a JSON list: %w", err)
			}
		}
		for _, item := range items {
			if err := enc.Encode(compute(item)); err != nil {
				return err
			}
		}
	}
}

func compute(raw json.RawMessage) reading {
	// Unstructured's own decoder keeps integers as int64, as kstatus expects of metadata.generation and
	// status.observedGeneration (encoding/json would make them float64, which kstatus refuses).
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(raw); err != nil {
		return reading{Error: err.Error()}
	}
	r := reading{Kind: u.GetKind(), Name: u.GetName()}
	res, err := status.Compute(u)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.Status, r.Message = res.Status.String(), res.Message
	return r
}
