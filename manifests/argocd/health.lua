-- Argo CD health check for Kiln's kinds (kiln.dev TrainingJob, ModelCompression, ModelDeployment).
-- It reads what kstatus (and so Flux) reads: status.observedGeneration, then the Stalled, Reconciling and Ready
-- conditions; docs/operations.md says how to install it in argocd-cm. Argo CD runs a script from argocd-cm without
-- Lua's string library, so this one uses only the base and table libraries.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return (c.reason or c.type) .. ": " .. c.message
  end
  return c.reason or c.type
end

local generation = obj.metadata.generation
if obj.status == nil or obj.status.observedGeneration == nil
    or (generation ~= nil and obj.status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Kiln operator to observe generation " .. tostring(generation)
  return hs
end

local stalled, reconciling, ready = condition("Stalled"), condition("Reconciling"), condition("Ready")
if stalled ~= nil and stalled.status == "True" then
  -- Failed for good, a model that cannot load, or a rollback: nothing changes without a new spec or artifact.
  hs.status = "Degraded"
  hs.message = said(stalled)
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = said(reconciling)
elseif ready ~= nil and ready.status == "True" then
  -- A TrainingJob suspended by its spec, or a candidate held for a person's approval: as the spec asks, not running.
  if obj.status.phase == "Suspended" or obj.status.phase == "AwaitingApproval" then
    hs.status = "Suspended"
  else
    hs.status = "Healthy"
  end
  hs.message = said(ready)
else
  hs.status = "Progressing"
  if ready ~= nil then
    hs.message = said(ready)
  else
    hs.message = "Waiting for the Kiln operator's Ready condition"
  end
end
return hs
