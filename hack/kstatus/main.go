// Command kstatus prints what sigs.k8s.io/cli-utils/pkg/kstatus computes for Kubernetes objects: the reading
// (Current, InProgress, Failed, ...) that Flux, and the tools built on kstatus, give a custom resource's status.
//
// Input on stdin: JSON objects, one after another (one per line, say), or JSON lists of them. Output on stdout:
// one JSON line per object, in order: {"kind", "name", "status", "message"}, or {"kind", "name", "error"} when
// kstatus cannot compute a reading. `kstatus --version` names the cli-utils version it was built with.
//
// `kstatus --argocd-health SCRIPT` gives Argo CD's reading instead (Healthy, Progressing, Degraded, Suspended,
// ...): the Lua health check SCRIPT run as Argo CD runs one from its argocd-cm ConfigMap, in the interpreter it
// embeds (github.com/yuin/gopher-lua) with only the libraries it opens for such scripts (package, base and table:
// no string library), the object as the global `obj`, and a one-second limit.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"time"

	lua "github.com/yuin/gopher-lua"
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
	argocd := flag.String("argocd-health", "", "read health with this Argo CD Lua health check instead of kstatus")
	flag.Parse()
	if *version {
		fmt.Printf("kstatus sigs.k8s.io/cli-utils %s (source %s), gopher-lua %s\n",
			depVersion("sigs.k8s.io/cli-utils"), source, depVersion("github.com/yuin/gopher-lua"))
		return
	}
	read := compute
	if *argocd != "" {
		script, err := os.ReadFile(*argocd)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kstatus:", err)
			os.Exit(1)
		}
		read = func(raw json.RawMessage) reading { return argoHealth(raw, string(script)) }
	}
	if err := run(os.Stdin, os.Stdout, read); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}

func depVersion(path string) string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == path {
				return dep.Version
			}
		}
	}
	return "unknown"
}

func run(in io.Reader, out io.Writer, read func(json.RawMessage) reading) error {
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
			if err := enc.Encode(read(item)); err != nil {
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

// argoHealth runs a Lua health check on one object the way Argo CD's util/lua does for a script configured in
// argocd-cm (UseOpenLibs false): only the package, base and table libraries, `obj` decoded from the object (JSON
// numbers as Lua numbers, lists as 1-based tables), and the table the script returns read as {status, message},
// where a status Argo CD does not know reads Unknown.
func argoHealth(raw json.RawMessage, script string) reading {
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(raw); err != nil {
		return reading{Error: err.Error()}
	}
	r := reading{Kind: u.GetKind(), Name: u.GetName()}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name))
		if err != nil {
			r.Error = err.Error()
			return r
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, u.Object))
	if err := l.DoString(script); err != nil {
		r.Error = err.Error()
		return r
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		r.Error = "expect table output from Lua script, not " + l.Get(-1).Type().String()
		return r
	}
	r.Status, r.Message = lua.LVAsString(table.RawGetString("status")), lua.LVAsString(table.RawGetString("message"))
	switch r.Status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
	default:
		r.Status, r.Message = "Unknown", "Lua returned an invalid health status"
	}
	return r
}

func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case int64:
		return lua.LNumber(v)
	case float64:
		return lua.LNumber(v)
	case []any:
		t := l.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetString(key, toLua(l, item))
		}
		return t
	}
	return lua.LNil
}
